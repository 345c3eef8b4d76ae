"""`icon2_lens.run_distill` and ``icon2-lens distill`` on the tiny model: the layout, reuse on rerun, re-running
exactly what a changed setting touches, the CLI, and clear errors.

The teacher's text comes from a scripted engine (a random tiny model writes no "The answer is X."): right and
wrong rationales by the sample's seed, and self-evaluations with a readable label most of the time. Everything
else is real: the probe reads the tiny teacher's residual stream, the students are trained and answer greedily.
A tiny student answers nothing right, so the tests check that the figures are consistent, not that they are
high."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

import icon2_lens as il
from icon2_lens.cli import main
from icon2_lens.distill import teacher as teacher_mod
from icon2_lens.distill.problems import load_problems
from icon2_lens.gen import Generation
from icon2_lens.pipeline.distill_run import STUDENTS, DistillConfig, majority_control, run_distill, text_agreement

CFG = DistillConfig(n_problems=8, k=2, m=1, max_new_tokens=8, eval_tokens=8, teacher_batch_size=4, max_steps=1,
                    batch_size=2, precision="fp32", predict_tokens=3, explain_tokens=4, test_batch_size=4)
GOLD = {p.question: p.answer for p in load_problems("arithmetic", limit=8, seed=0)}


class ScriptedTeacher:
    """Rationales right on even seeds and wrong on odd ones; evaluations 'correct', 'wrong' or unreadable."""

    def __init__(self, answers: bool = True) -> None:
        self.answers, self.calls = answers, 0

    def generate(self, prompts, decoding, *, seed=0, **_):
        self.calls += len(prompts)
        out = []
        for p, s in zip(prompts, seed, strict=True):
            if p.endswith("Evaluation:"):
                text = ("It checks out.\n\nEvaluation result: the given answer is correct." if s % 3 == 0 else
                        "A step is off.\n\nEvaluation result: the given answer is wrong." if s % 3 == 1 else "Hmm.")
            elif not self.answers:
                text = "I do not know."
            else:
                question = p.rsplit("Question: ", 1)[1].split("\nAnswer:", 1)[0]
                gold = int(GOLD[question])
                text = f"Add the numbers up. The answer is {gold if s % 2 == 0 else gold + 1}."
            out.append(Generation(text, True, 5))
        return out


@pytest.fixture
def scripted(monkeypatch):
    eng = ScriptedTeacher()
    monkeypatch.setattr(teacher_mod, "engine", lambda model: eng)
    return eng


def _consistent(cell):
    assert cell["n"] > 0 and 0 <= cell["correct"] <= cell["n"]
    assert cell["accuracy"] == pytest.approx(cell["correct"] / cell["n"])
    assert cell["ci_low"] <= cell["accuracy"] <= cell["ci_high"] and 0 <= cell["ci_low"] and cell["ci_high"] <= 1


def test_run_distill_writes_the_layout_reuses_and_reruns_what_changed(talker_dir, scripted, tmp_path):
    out = tmp_path / "mm"
    res = run_distill(CFG, teacher=talker_dir, student=talker_dir, out=out, device="cpu", progress=False, log=None)
    assert res.ran == ["problems", "teacher", "data", "probe", "train:single", "train:multi",
                       "train:multi_self_eval", *(f"evaluate:{s}" for s in STUDENTS)]
    train = [json.loads(x) for x in (out / "problems" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "problems" / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (6, 2) and not {r["question"] for r in train} & {r["question"] for r in test}
    teacher_rows = [json.loads(x) for x in (out / "teacher" / "teacher.jsonl").read_text().splitlines()]
    assert [r["question"] for r in teacher_rows] == [r["question"] for r in train + test]
    costs = json.loads((out / "teacher" / "costs.json").read_text())
    assert costs["rows"] == 8 and set(costs["phases"]) == {"generation", "labelling"}
    rat = [json.loads(x) for x in (out / "data" / "rationales.jsonl").read_text().splitlines()]
    sev = [json.loads(x) for x in (out / "data" / "self_eval.jsonl").read_text().splitlines()]
    assert len(rat) == 12 and {r["source_index"] for r in rat} == set(range(6))  # train questions only
    assert sev and all(r["label"] in ("correct", "wrong") for r in sev)
    prov = json.loads((out / "data" / "provenance.json").read_text())
    assert prov["teacher"] == "tiny-talker" and prov["rows"] == {"rationales": 12, "self_eval": len(sev)}
    probe = json.loads((out / "probe" / "probe.json").read_text())
    assert probe["fitted"] and probe["agreement"]["n"] == 4 and probe["agreement"]["n_seen_questions"] == 0
    assert (out / "probe" / "answer_probe.safetensors").is_file()
    for folder in ("students/single", "students/multi", "student"):
        assert (out / folder / "config.json").is_file() and (out / folder / "student_config.json").is_file()
    assert json.loads((out / "student" / "student_config.json").read_text())["schedule"] == ["self_eval", "rationale"]
    assert json.loads((out / "students" / "multi" / "student_config.json").read_text())["schedule"] == ["rationale"]
    single = json.loads((out / "students" / "single" / "student_config.json").read_text())
    assert single["mode"] == "single" and single["n_examples"] == {"rationale": 6}
    assert res.student == out / "student" and il.load_model(res.student, device="cpu").n_layers == 4

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == res.metrics
    assert list(metrics["students"]) == list(STUDENTS)
    for name, row in metrics["students"].items():
        assert row["n"] == 2 and row["key"] == name
        _consistent(row)
        _consistent(row["explain"])
    assert [r["key"] for r in metrics["table"]] == ["teacher_majority_vote", "teacher_per_rationale", *STUDENTS]
    vote, per = metrics["teacher_accuracy"]["majority_vote"], metrics["teacher_accuracy"]["per_rationale"]
    _consistent(vote)
    _consistent(per)
    test_rows = teacher_rows[6:]
    assert per["n"] == 4 and per["correct"] == sum(c for r in test_rows for c in r["rationale_correct"])
    _consistent(metrics["student_self_eval"])
    sev_cell = metrics["self_evaluation"]
    assert sev_cell["text"] == text_agreement(test_rows) and sev_cell["probe"]["n"] == sev_cell["text"]["n"] == 4
    assert sev_cell["better"] in ("probe", "text", "not distinguishable at this size")
    control = sev_cell["control"]  # always the train rationales' more common class, on the same test rationales
    assert control == majority_control(teacher_rows[:6], test_rows) and control["n"] == 4
    assert 'control: always "' in res.report.read_text()
    assert metrics["data"]["rationale_rows"] == 12 and metrics["data"]["rationale_rows_per_question"] == 2
    assert metrics["costs"]["questions_measured"] == 8
    assert metrics["costs"]["phases"]["generation"]["wall_seconds_per_question"] is not None
    assert {c["verdict"] for c in metrics["comparisons"]} == {"not distinguishable at this size"}  # n = 2
    report = res.report.read_text()
    assert "not distinguishable at this size" in report and "| base student (not distilled) |" in report
    assert "Teacher cost per question" in report and "answer probe" in report

    calls = scripted.calls
    again = run_distill(CFG, teacher=talker_dir, student=talker_dir, out=out, device="cpu", progress=False, log=None)
    assert again.ran == [] and scripted.calls == calls and again.metrics == metrics

    narrower = run_distill(replace(CFG, level=0.5), teacher=talker_dir, student=talker_dir, out=out, device="cpu",
                           progress=False, log=None)
    assert narrower.ran == [] and narrower.metrics["level"] == 0.5  # intervals are recomputed, nothing re-run
    for name in STUDENTS:
        wide, narrow = metrics["students"][name], narrower.metrics["students"][name]
        assert narrow["ci_high"] - narrow["ci_low"] < wide["ci_high"] - wide["ci_low"]
    assert json.loads((out / "data" / "teacher_summary.json").read_text())["test"]["level"] == 0.5

    teacher_mtime = (out / "teacher" / "teacher.jsonl").stat().st_mtime_ns
    changed = run_distill(replace(CFG, learning_rate=1e-3), teacher=talker_dir, student=talker_dir, out=out,
                          device="cpu", progress=False, log=None)
    assert changed.ran == ["train:single", "train:multi", "train:multi_self_eval", "evaluate:single",
                           "evaluate:multi", "evaluate:multi_self_eval"]
    assert (out / "teacher" / "teacher.jsonl").stat().st_mtime_ns == teacher_mtime and scripted.calls == calls
    assert json.loads((out / "student" / "student_config.json").read_text())["learning_rate"] == 1e-3


def test_an_interrupted_teacher_step_resumes_where_it_stopped(talker_dir, monkeypatch, tmp_path):
    class Interrupted(ScriptedTeacher):
        def generate(self, prompts, decoding, *, seed=0, **kw):
            if self.calls >= 16:  # batch 0 done (8 rationales, 8 evaluations): die in batch 1
                raise KeyboardInterrupt
            return super().generate(prompts, decoding, seed=seed, **kw)

    monkeypatch.setattr(teacher_mod, "engine", lambda model: Interrupted())
    out = tmp_path / "mm"
    with pytest.raises(KeyboardInterrupt):
        run_distill(CFG, teacher=talker_dir, out=out, device="cpu", progress=False, log=None, stop_after="data")
    assert json.loads((out / "steps.json").read_text())["teacher"]["status"] == "running"
    assert len((out / "teacher" / "teacher.jsonl").read_text().splitlines()) == 4
    eng = ScriptedTeacher()
    monkeypatch.setattr(teacher_mod, "engine", lambda model: eng)
    res = run_distill(CFG, teacher=talker_dir, out=out, device="cpu", progress=False, log=None, stop_after="data")
    assert res.ran == ["teacher", "data"] and eng.calls == 16  # only batch 1 was made
    rows = [json.loads(x) for x in (out / "teacher" / "teacher.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8)) and res.metrics == {} and res.report is None


def test_teacher_data_without_answers_is_refused_before_training(talker_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(teacher_mod, "engine", lambda model: ScriptedTeacher(answers=False))
    with pytest.raises(ValueError, match="no rationale with a readable answer"):
        run_distill(CFG, teacher=talker_dir, student=talker_dir, out=tmp_path / "mm", device="cpu", progress=False,
                    log=None)
    assert not (tmp_path / "mm" / "students").exists() and (tmp_path / "mm" / "data" / "teacher_summary.json").is_file()


def test_distill_cli_data_train_and_run(talker_dir, scripted, tmp_path, capsys):
    out = tmp_path / "mm"
    data = ["--n-problems", "8", "--k", "2", "--m", "1", "--max-new-tokens", "8", "--eval-tokens", "8"]
    assert main(["distill", "data", "--teacher", str(talker_dir), "--out", str(out), "--device", "cpu",
                 "--no-progress", *data]) == 0
    printed = capsys.readouterr().out
    assert '"rationale_accuracy"' in printed and "rationales.jsonl" in printed
    assert (out / "data" / "self_eval.jsonl").is_file() and not (out / "student").exists()

    student = tmp_path / "single"
    assert main(["distill", "train", "--data", str(out), "--out", str(student), "--student", str(talker_dir),
                 "--mode", "single", "--no-self-eval", "--max-steps", "1", "--batch-size", "2", "--precision", "fp32",
                 "--device", "cpu", "--no-progress"]) == 0
    saved = json.loads((student / "student_config.json").read_text())
    assert saved["mode"] == "single" and saved["schedule"] == ["rationale"] and saved["max_steps"] == 1
    il.load_model(student, device="cpu")

    calls = scripted.calls
    assert main(["distill", "run", "--teacher", str(talker_dir), "--student", str(talker_dir), "--out", str(out),
                 "--device", "cpu", "--no-progress", *data, "--max-steps", "1", "--batch-size", "2",
                 "--precision", "fp32", "--predict-tokens", "3", "--explain-tokens", "4"]) == 0
    assert scripted.calls == calls  # the data of `distill data` were reused
    printed = capsys.readouterr().out
    assert "multi-rationale + self-evaluation (Mind's Mirror)" in printed and "metrics.json" in printed
    assert set(json.loads((out / "metrics.json").read_text())["students"]) == set(STUDENTS)


def test_distill_cli_refuses_bad_input_with_exit_code_2(tmp_path, capsys):
    cases = [
        (["distill", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "s")], "distill data --out"),
        (["distill", "train", "--data", str(tmp_path), "--out", str(tmp_path / "s")], "holds no rationales.jsonl"),
        (["distill", "run", "--out", str(tmp_path / "r"), "--n-problems", "1"], "--n-problems must be at least 2"),
        (["distill", "run", "--out", str(tmp_path / "r"), "--problems", str(tmp_path / "no.jsonl")], "does not exist"),
    ]
    (tmp_path / "d" / "data").mkdir(parents=True)
    (tmp_path / "d" / "data" / "rationales.jsonl").write_text("")
    cases.append((["distill", "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--mode",
                   "both"], "Unknown --mode 'both'"))
    cases.append((["distill", "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s")],
                  "--no-self-eval"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("icon2-lens distill: error:") and message in err, (argv, err)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["distill", "run", "--out", str(tmp_path / "full")]) == 2
    assert "holds no distill run" in capsys.readouterr().err


def test_the_pipeline_stage_is_off_by_default_and_runs_run_distill_when_on(talker_dir, scripted, tmp_path):
    from icon2_lens.pipeline.stages import STAGES

    assert il.RunConfig().distill.enabled is False
    spec = STAGES["distill"]
    assert spec.run(SimpleNamespace(), tmp_path, None, DistillConfig(), SimpleNamespace(enabled=False)) == (0, [])
    section = {"enabled": True, "n_problems": 8, "k": 2, "m": 1, "max_new_tokens": 8, "eval_tokens": 8,
               "max_steps": 1, "batch_size": 2, "precision": "fp32", "predict_tokens": 3, "explain_tokens": 4,
               "probe": False}
    res = il.run_pipeline({"model": str(talker_dir), "device": "cpu", "distill": section}, out=tmp_path / "run",
                          stages={"distill": spec}, progress=False, log=None)
    assert res.ran == ["distill"]
    metrics = json.loads((tmp_path / "run" / "distill" / "metrics.json").read_text())
    assert metrics["self_evaluation"]["better"] == "probe off" and metrics["split"]["n_test"] == 2
    assert (tmp_path / "run" / "distill" / "student" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["distill"]["rows"] == 2


def test_majority_control_says_the_train_majority_class():
    train = [{"rationale_answers": ["1", "2", "3"], "rationale_correct": [True, True, False]}]
    test = [{"rationale_answers": ["5", "4", None, "6"], "rationale_correct": [True, False, True, False]}]
    c = majority_control(train, test)
    assert c["label"] == "correct" and (c["correct"], c["n"]) == (1, 3)  # unreadable answers are not scored
    c = majority_control([{"rationale_answers": ["1"], "rationale_correct": [False]}], test)
    assert c["label"] == "wrong" and (c["correct"], c["n"]) == (2, 3) and c["ci_low"] < 2 / 3 < c["ci_high"]
