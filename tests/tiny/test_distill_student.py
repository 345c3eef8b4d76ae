"""The Mind's Mirror student on the tiny model: the two-task loss (hand-checked), the two-stage schedule, the saved
folder, the single-rationale baseline, the accuracy functions (fake engine) and the answer probe."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import icon2_lens as il
from icon2_lens.distill.probe import AnswerProbe, fit_answer_direction, probe_rows
from icon2_lens.distill.student import (
    StudentConfig,
    TwoTaskCollator,
    parse_answer,
    rationale_examples,
    self_eval_accuracy,
    self_eval_examples,
    single_rationale,
    solution_text,
    student_accuracy,
    tokenize_examples,
    train_student,
    two_task_loss,
)
from icon2_lens.gen import Generation
from icon2_lens.prompts import pre_query_template
from icon2_lens.reward_probe import wilson_interval

QUESTIONS = [f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?" for i in range(1, 5)]


def rationale_rows() -> list[dict]:
    rows = []
    for k, q in enumerate(QUESTIONS):
        gold = str(2 * (k + 1) + 2)
        for j, ans in enumerate((str(int(gold) + 1), gold, gold)):  # the first rationale of each question is wrong
            rows.append({"question": q, "rationale": f"He has {k + 1} and buys {k + 3} (try {j}).", "answer": ans,
                         "gold": gold, "correct": ans == gold, "source_index": k})
    return rows


def self_eval_rows() -> list[dict]:
    return [{"question": r["question"], "rationale": r["rationale"] + f" The answer is {r['answer']}.",
             "label": "correct" if r["correct"] else "wrong",
             "evaluation": "Evaluation:\n\nThe sum is checked step by step.", "rationale_correct": r["correct"]}
            for r in rationale_rows()]


# ------------------------------------------------------------------------------------------------ format


def test_task_format():
    ex, skipped = rationale_examples([*rationale_rows()[:1], {"question": "q", "rationale": "r", "answer": None}])
    assert skipped == 1
    pu, pt, eu, et = ex[0]
    assert pu == f"predict: {QUESTIONS[0]}" and pt == "5"
    assert eu == f"explain: {QUESTIONS[0]}" and et == "He has 1 and buys 3 (try 0). The answer is 5."
    ex, skipped = self_eval_examples([*self_eval_rows()[:1], {"question": "q", "rationale": "r", "label": None,
                                                              "evaluation": ""}])
    assert skipped == 1
    pu, pt, eu, et = ex[0]
    assert pu == (f"predict: {QUESTIONS[0]}\nProposed solution: He has 1 and buys 3 (try 0). The answer is 5.")
    assert eu == "explain: " + pu.removeprefix("predict: ")
    assert pt == "the given answer is wrong" and et.startswith("Evaluation:")
    assert solution_text("x. The answer is 5.", "5") == "x. The answer is 5."
    assert parse_answer("so 2 + 3 = 5. The answer is 5.") == "5" and parse_answer("(2 + 3)") == "5"
    assert parse_answer("I do not know") is None
    with pytest.raises(ValueError, match="lacks 'answer'"):
        rationale_examples([{"question": "q", "rationale": "r"}])


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        StudentConfig(alpha=1.5)
    with pytest.raises(ValueError, match="max_steps"):
        StudentConfig(max_steps=0)
    with pytest.raises(ValueError, match="precision"):
        StudentConfig(precision="fp16")
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        StudentConfig(batch_size=2.0)


def test_single_rationale_picks_first_correct_else_first():
    from datasets import Dataset

    rows = rationale_rows()
    rows.append({"question": "other", "rationale": "r", "answer": "1", "gold": "2", "correct": False,
                 "source_index": 9})
    rows.append({"question": "other", "rationale": "r2", "answer": "3", "gold": "2", "correct": False,
                 "source_index": 9})
    picked = single_rationale(rows)
    assert [r["source_index"] for r in picked] == [0, 1, 2, 3, 9]
    assert all(r["correct"] for r in picked[:4]) and [r["rationale"][-8:] for r in picked[:4]] == ["(try 1)."] * 4
    assert picked[4]["rationale"] == "r"
    ds = single_rationale(Dataset.from_list(rows))
    assert isinstance(ds, Dataset) and ds.to_list() == picked
    # without source_index, the question tells questions apart
    no_index = [{k: v for k, v in r.items() if k != "source_index"} for r in rows]
    assert [r["rationale"] for r in single_rationale(no_index)] == [r["rationale"] for r in picked]


# ------------------------------------------------------------------------------------------------ loss


def test_two_task_loss_is_the_alpha_weighted_per_task_token_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 1, -100], [-100, 2, -100, -100, -100],
                           [-100, 4, 5, 6, 0], [-100, -100, -100, 1, 2]])
    task = torch.tensor([0, 0, 1, 1])
    per_task: dict[int, list[float]] = {0: [], 1: []}
    for b in range(4):
        for t in range(1, 5):
            if labels[b, t] != -100:
                lp = torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
                per_task[int(task[b])].append(-float(lp))
    ce_p, ce_e = (sum(v) / len(v) for v in (per_task[0], per_task[1]))
    for alpha in (0.5, 0.2, 1.0, 0.0):
        loss, lp, le = two_task_loss(logits, labels, task, alpha)
        assert lp.item() == pytest.approx(ce_p, rel=1e-5) and le.item() == pytest.approx(ce_e, rel=1e-5)
        assert loss.item() == pytest.approx(alpha * ce_p + (1 - alpha) * ce_e, rel=1e-5)


def test_two_task_loss_on_the_tiny_model_matches_hand_computed_ce(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    eot = pre_query_template(tok).end_of_turn_id
    ex, _ = rationale_examples(rationale_rows()[:3])
    feats, dropped = tokenize_examples(tok, ex, 384, eot)
    assert dropped == 0
    f0 = feats[0]
    prompt = tok(il.render_chat(tok, ex[0][0]), add_special_tokens=False)["input_ids"]
    assert f0["pred_input_ids"][:f0["pred_prompt_len"]] == prompt and f0["pred_input_ids"][-1] == eot
    assert tok.decode(f0["expl_input_ids"][f0["expl_prompt_len"]:-1]) == ex[0][3]
    batch = TwoTaskCollator(tok.pad_token_id)(feats)
    assert batch["input_ids"].shape[0] == 6 and batch["task"].tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # by hand: each sequence alone, unpadded; CE of each target token given everything before it
        per_task: dict[str, list[float]] = {"pred": [], "expl": []}
        for f in feats:
            for t in ("pred", "expl"):
                ids, p = f[f"{t}_input_ids"], f[f"{t}_prompt_len"]
                lps = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0], -1)
                per_task[t] += [-float(lps[i - 1, ids[i]]) for i in range(p, len(ids))]
    ce_p = sum(per_task["pred"]) / len(per_task["pred"])
    ce_e = sum(per_task["expl"]) / len(per_task["expl"])
    loss, lp, le = two_task_loss(logits, batch["labels"], batch["task"], 0.3)
    assert lp.item() == pytest.approx(ce_p, rel=1e-4) and le.item() == pytest.approx(ce_e, rel=1e-4)
    assert loss.item() == pytest.approx(0.3 * ce_p + 0.7 * ce_e, rel=1e-4)


def test_max_length_cuts_targets_and_drops_prompts_that_do_not_fit(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot = pre_query_template(tok).end_of_turn_id
    ex, _ = rationale_examples(rationale_rows()[:1])
    plens = [len(tok(il.render_chat(tok, ex[0][i]), add_special_tokens=False)["input_ids"]) for i in (0, 2)]
    full = [plens[0] + len(tok(ex[0][1], add_special_tokens=False)["input_ids"]) + 1,
            plens[1] + len(tok(ex[0][3], add_special_tokens=False)["input_ids"]) + 1]
    ml = max(plens) + 2
    feats, dropped = tokenize_examples(tok, ex, ml, eot)
    assert dropped == 0
    assert [len(feats[0]["pred_input_ids"]), len(feats[0]["expl_input_ids"])] == [min(f, ml) for f in full]
    assert feats[0]["expl_input_ids"][-1] != eot and full[1] > ml  # the long target was cut
    assert tokenize_examples(tok, ex, max(plens), eot) == ([], 1)  # a prompt that fills max_length: the pair goes


# ------------------------------------------------------------------------------------------------ training


def test_train_student_runs_self_eval_then_rationales_and_saves_a_loadable_folder(tiny_model_dir, tmp_path):
    cfg = StudentConfig(max_steps=2, batch_size=2, learning_rate=1e-3, precision="fp32")
    lines: list[str] = []
    res = train_student(rationale_rows(), self_eval_rows(), config=cfg, model_source=tiny_model_dir,
                        output_dir=tmp_path / "student", device="cpu", progress=False, log=lines.append)
    assert res.steps == {"self_eval": 2, "rationale": 2}
    assert res.n_examples == {"self_eval": 12, "rationale": 12}
    assert [(r["stage"], r["step"]) for r in res.history] == [("self_eval", 1), ("self_eval", 2),
                                                               ("rationale", 1), ("rationale", 2)]
    for r in res.history:  # the logged loss is the alpha-weighted combination of the two task losses
        assert r["loss"] == pytest.approx(0.5 * r["loss_predict"] + 0.5 * r["loss_explain"], rel=1e-4)
    logged = [json.loads(x) for x in res.log_path.read_text().splitlines()]
    assert logged == res.history
    saved = json.loads(res.config_path.read_text())
    assert saved["schedule"] == ["self_eval", "rationale"] and saved["mode"] == "multi"
    assert saved["alpha"] == 0.5 and saved["precision_used"] == "fp32" and saved["steps"] == res.steps
    assert any(line.startswith("training precision: fp32") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temp or trainer folders left
    student = il.load_model(res.output_dir, device="cpu")
    assert student.n_layers == 4
    # the weights moved away from the base model
    base = il.load_model(tiny_model_dir, device="cpu")
    a = dict(base.hf_model().named_parameters())
    b = dict(student.hf_model().named_parameters())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        train_student(rationale_rows(), config=cfg, model_source=tiny_model_dir, output_dir=res.output_dir,
                      device="cpu", progress=False, log=lines.append)


def test_train_student_single_mode_keeps_one_rationale_per_question(tiny_model_dir, tmp_path):
    cfg = StudentConfig(max_steps=1, batch_size=4, alpha=1.0, precision="fp32")
    res = train_student(rationale_rows(), config=cfg, mode="single", model_source=tiny_model_dir,
                        output_dir=tmp_path / "single", device="cpu", progress=False, log=lambda s: None)
    assert res.steps == {"rationale": 1} and res.n_examples == {"rationale": 4}
    (row,) = res.history
    assert row["stage"] == "rationale" and row["loss"] == pytest.approx(row["loss_predict"], rel=1e-4)
    saved = json.loads(res.config_path.read_text())
    assert saved["mode"] == "single" and saved["n_rationale_rows_given"] == 12 and saved["schedule"] == ["rationale"]
    with pytest.raises(ValueError, match="mode"):
        train_student(rationale_rows(), mode="both", output_dir=tmp_path / "x")


# ------------------------------------------------------------------------------------------------ evaluation


class FakeEngine:
    """Answers from a table keyed by the user turn found in the rendered prompt."""

    name = "fake"

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, prompts, decoding, *, steer=None, seed=0, stop=None):
        self.calls.append((list(prompts), decoding))
        out = []
        for p in prompts:
            user = next(u for u in self.replies if f"user\n{u}<|im_end|>" in p)
            out.append(Generation(self.replies[user], True, 3))
        return out


def fake_model(tokenizer, replies):
    return SimpleNamespace(tokenizer=tokenizer, engines={"hf": FakeEngine(tokenizer, replies)})


def test_student_accuracy_reads_predict_and_explain_answers(tiny_model):
    tok = tiny_model.tokenizer
    problems = [{"question": "What is 2 + 3?", "answer": "5"}, SimpleNamespace(question="What is 4 * 2?", answer="8"),
                {"question": "What is 9 - 1?", "answer": "8"}]
    replies = {"predict: What is 2 + 3?": "5", "predict: What is 4 * 2?": "9 apples.", "predict: What is 9 - 1?": "hm",
               "explain: What is 2 + 3?": "2 + 3 = 5. The answer is 5.",
               "explain: What is 4 * 2?": "4 * 2 = 8. The answer is (4 * 2).",
               "explain: What is 9 - 1?": "9 - 1 = 8. The answer is 7."}
    model = fake_model(tok, replies)
    acc = student_accuracy(model, problems, batch_size=2, max_new_tokens=5, explain_max_new_tokens=50)
    lo, hi = wilson_interval(1, 3, level=0.9)
    assert acc["predict"] == {"accuracy": 1 / 3, "n": 3, "correct": 1, "ci_low": lo, "ci_high": hi, "level": 0.9,
                              "n_unparsed": 1}
    assert acc["explain"]["accuracy"] == pytest.approx(2 / 3) and acc["explain"]["n_unparsed"] == 0
    assert [i["predict_answer"] for i in acc["items"]] == ["5", "9", None]
    assert [i["explain_correct"] for i in acc["items"]] == [True, True, False]
    calls = model.engines["hf"].calls
    assert [len(p) for p, _ in calls] == [2, 1, 2, 1]  # batches of 2, predict then explain
    assert [d.max_new_tokens for _, d in calls] == [5, 5, 50, 50] and not any(d.do_sample for _, d in calls)
    assert calls[0][0][0] == il.render_chat(tok, "predict: What is 2 + 3?")
    only = student_accuracy(model, problems, tasks=["explain"])
    assert set(only) == {"explain", "items"}
    with pytest.raises(ValueError, match="Unknown tasks"):
        student_accuracy(model, problems, tasks=["judge"])


def test_self_eval_accuracy_compares_the_students_labels_with_gold(tiny_model):
    tok = tiny_model.tokenizer
    problems = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    answers = ["0 + 1 = 1. The answer is 1.", "1 + 1 = 3. The answer is 3.", "3", "5"]
    sol = ["0 + 1 = 1. The answer is 1.", "1 + 1 = 3. The answer is 3.", "The answer is 3.", "The answer is 5."]
    labels = ["the given answer is correct", "the given answer is correct", "the given answer is uncertain",
              "the given answer is wrong"]
    replies = {f"predict: {p['question']}\nProposed solution: {s}": lab
               for p, s, lab in zip(problems, sol, labels, strict=True)}
    out = self_eval_accuracy(fake_model(tok, replies), problems, answers)
    # row 0: right answer, "correct" (agree); row 1: wrong, "correct" (no); row 2: right, uncertain (no);
    # row 3: wrong, "wrong" (agree)
    assert out["accuracy"] == 0.5 and out["n"] == 4 and out["correct"] == 2
    assert (out["ci_low"], out["ci_high"]) == wilson_interval(2, 4, level=0.9)
    assert out["decided_accuracy"] == pytest.approx(2 / 3) and out["n_decided"] == 3
    assert out["label_counts"] == {"correct": 2, "wrong": 1, "uncertain": 1, "none": 0}
    assert out["answers_right"] == 2 and [i["agrees"] for i in out["items"]] == [True, False, False, True]
    with pytest.raises(ValueError, match="one answer per problem"):
        self_eval_accuracy(fake_model(tok, replies), problems, answers[:2])


def test_student_accuracy_runs_on_a_real_tiny_model(tiny_model):
    acc = student_accuracy(tiny_model, [{"question": "What is 2 + 3?", "answer": "5"}], max_new_tokens=3,
                           explain_max_new_tokens=4)
    assert acc["predict"]["n"] == 1 and 0 <= acc["explain"]["accuracy"] <= 1


# ------------------------------------------------------------------------------------------------ the answer probe


def probe_data(ids, right_answer="7", wrong_answer="zzzzzzzz qqqqqqqq"):
    rows = []
    for i in ids:
        q = f"Question {i}: how many birds sit on {i} trees?"
        rows.append({"question": q, "rationale": f"Each tree has some birds ({i}).", "answer": right_answer,
                     "correct": True})
        rows.append((q, f"Each tree has some birds ({i}). The answer is {wrong_answer}.", False))
    return rows


def test_answer_probe_separates_an_easy_synthetic_case(tiny_model):
    probe = AnswerProbe.fit(tiny_model, probe_data(range(12)))
    assert probe.layers == [1] and probe.n_fit == {"right": 12, "wrong": 12}
    held = probe_data(range(100, 108))
    res = probe.agreement(held)
    assert res["n"] == 16 and res["n_seen_questions"] == 0
    assert res["accuracy"] >= 0.9 and res["auc"] >= 0.9 and res["ci_low"] <= res["accuracy"] <= res["ci_high"]
    assert res["per_class"]["right"]["n"] == 8
    scores = probe.probe(held)
    assert len(scores) == 16 and all(isinstance(s, float) for s in scores)
    assert probe.labels(held[:2]) == ["correct", "wrong"]
    assert probe.agreement(probe_data(range(2)))["n_seen_questions"] == 4
    assert probe.describe()["n_fit"] == {"right": 12, "wrong": 12}


def test_answer_probe_refuses_one_class(tiny_model):
    only_right = [r for r in probe_data(range(4)) if isinstance(r, dict)]
    with pytest.raises(ValueError, match="right and with wrong answers"):
        AnswerProbe.fit(tiny_model, only_right)
    with pytest.raises(ValueError, match="correct"):
        AnswerProbe.fit(tiny_model, [{"question": "q", "rationale": "The answer is 1."}])
    with pytest.raises(ValueError, match="right and with wrong answers"):
        fit_answer_direction(torch.zeros(3, 1, 4), torch.tensor([False, False, False]))


def test_fit_answer_direction_math():
    h = torch.tensor([[[3.0, 0.0]], [[1.0, 1.0]], [[5.0, 1.0]], [[-1.0, 0.0]]])
    u, mid, scale = fit_answer_direction(h, torch.tensor([True, True, True, False]))
    assert u[0].tolist() == pytest.approx([(4.0) / math.hypot(4.0, 2 / 3), (2 / 3) / math.hypot(4.0, 2 / 3)])
    p = torch.einsum("nld,ld->nl", h, u)[:, 0]
    assert mid.item() == pytest.approx(((p[:3].mean() + p[3]) / 2).item(), rel=1e-5)
    within = torch.cat([p[:3] - p[:3].mean(), p[3:] - p[3:].mean()])
    assert scale.item() == pytest.approx(within.pow(2).mean().sqrt().item(), rel=1e-5)
    assert probe_rows([("q", "t", True)]) == [("q", "t", True)]
