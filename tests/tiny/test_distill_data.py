"""Mind's Mirror's data: generated problems, the paper's extraction rules, the teacher data and its two datasets."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from icon2_lens.distill import teacher as teacher_mod
from icon2_lens.distill.extract import (
    answers_match,
    evaluate_expression,
    evaluation_rationale,
    extract_answer,
    extract_label,
    extract_rationale,
    normalize_answer,
)
from icon2_lens.distill.problems import KINDS, Problem, load_problems, make_problems, split_problems
from icon2_lens.distill.teacher import (
    TeacherConfig,
    make_teacher_data,
    rationale_dataset,
    self_eval_dataset,
    teacher_summary,
)
from icon2_lens.gen import Generation
from icon2_lens.runs.costs import measure_costs

# ---------------------------------------------------------------------------------------------------- problems


def test_problems_are_seeded_distinct_and_verified():
    a, b = make_problems(60, seed=3), make_problems(60, seed=3)
    assert a == b and a != make_problems(60, seed=4)
    assert len({p.question for p in a}) == 60
    assert {p.kind for p in a} == set(KINDS) and {p.steps for p in a} == {1, 2}
    for p in a:
        value = evaluate_expression(p.equation)
        assert value is not None and value.denominator == 1 and value >= 0
        assert p.answer == str(value.numerator) and answers_match(p.answer, p.equation)
        assert int(p.answer) < 1000 and p.question.endswith("?")
    assert {p.steps for p in make_problems(10, steps=(2,))} == {2}
    assert make_problems(5, seed=3) == a[:5]  # a prefix of a longer run
    with pytest.raises(ValueError, match="steps"):
        make_problems(3, steps=(3,))


def test_split_is_deterministic_and_disjoint_by_question():
    ps = make_problems(40, seed=1)
    dup = [*ps, Problem(ps[0].question.upper(), ps[0].answer)]  # the same question again (case ignored)
    train, test = split_problems(dup, test_fraction=0.25, seed=2)
    assert (train, test) == split_problems(dup, test_fraction=0.25, seed=2)
    assert split_problems(dup, seed=3) != (train, test)
    assert len(train) + len(test) == 41 and len({p.question.lower() for p in test}) == 10
    assert not {p.question.lower() for p in train} & {p.question.lower() for p in test}
    assert [p for p in dup if p in train] == train  # input order kept
    with pytest.raises(ValueError, match="two distinct"):
        split_problems(ps[:1])


def test_load_problems_reads_jsonl_and_names_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text("\n".join([
        json.dumps({"question": "What is 2 + 3?", "answer": 5}),
        "",
        json.dumps({"question": "Tom has 1,000 coins and gets 200. How many now?", "answer": "1,200"}),
        json.dumps({"question": "Janet sells eggs.", "answer": "She makes 9 * 2 = $18.\n#### 18"}),  # GSM8K
        json.dumps({"question": "Half of 5?", "answer": "2.5", "equation": "5 / 2", "steps": 1}),
    ]) + "\n")
    ps = load_problems(good)
    assert [p.answer for p in ps] == ["5", "1200", "18", "2.5"] and ps[3].equation == "5 / 2"
    assert len(load_problems(good, limit=2)) == 2
    assert len(load_problems("arithmetic", limit=7)) == 7
    assert load_problems([{"question": "Q?", "answer": "3"}])[0] == Problem("Q?", "3")
    for line, message in [("{not json", "line 2: not JSON"), (json.dumps({"question": "Q"}), "line 2: missing answer"),
                          (json.dumps({"question": "Q", "answer": "many"}), "line 2: 'answer' 'many' is not a number"),
                          (json.dumps({"question": " ", "answer": 1}), "line 2: 'question' must be"),
                          (json.dumps({"question": "Q", "answer": 4, "equation": "2 + 3"}), "does not give"),
                          (json.dumps([1, 2]), "line 2: expected an object")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question": "Fine?", "answer": 1}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message) as err:
            load_problems(bad)
        assert str(bad) in str(err.value)
    with pytest.raises(FileNotFoundError, match="arithmetic"):
        load_problems(tmp_path / "missing.jsonl")


# -------------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(("text", "answer"), [
    ("The answer is 12.", "12"),
    ("the answer is (10 * 45).", "450"),
    ("So they planted 10 * 45 = 450 seeds. The answer is (10 * 45).", "450"),
    ("The answer is $5.50.", "5.5"),
    ("The answer is 2.5.", "2.5"),
    ("THE ANSWER IS 7", "7"),
    ("The answer is 3. Wait, let me redo it. The answer is 5.", "5"),  # the last one counts
    ("The answer is 10 - (3 + 6).", "1"),
    ("The answer is 15 - 6 = 8 years old.", "9"),  # the paper keeps the part before '='
    ("the answer is x = 5.", "5"),  # ... unless it holds no digit
    ("The answer is 1,200 apples.", "1200"),
    ("The answer is **12**.", "12"),
    ("The answer is: 7/2.\nNext question", "3.5"),
    ("The answer is -4.", "-4"),
    ("The final answer is 42", "42"),
    ("No answer here.", None),
    ("", None),
    ("The answer is twelve.", None),
    ("The answer is 3 boxes of 4.", None),  # "3  4" is no expression
    ("The answer is 5 / 0.", None),
    ("The answer is 2 ** 3.", None),  # no powers
    ("The answer is __import__('os').", None),  # letters are dropped; nothing is executed
    ("The answer is (1 + 2.", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_rationale_and_evaluation_parts():
    assert extract_rationale("He has 3 * 4 = 12. The answer is 12.") == "He has 3 * 4 = 12."
    assert extract_rationale("  Step one. Step two. So the answer is 12.") == "Step one. Step two."
    assert extract_rationale("First the answer is 3. Then 3 + 2 = 5. The answer is 5.") == \
        "First the answer is 3. Then 3 + 2 = 5."
    assert extract_rationale("The answer is 12.") == "" and extract_rationale("no answer. at all.") == ""
    assert evaluation_rationale("Evaluation:\n\nIt adds 2 and 3.\n\nEvaluation result: the given answer is correct.") \
        == "Evaluation:\n\nIt adds 2 and 3."
    assert evaluation_rationale("the given answer is wrong.\n") == ""


@pytest.mark.parametrize(("text", "label"), [
    ("Evaluation:\n\nFine.\n\nEvaluation result: the given answer is correct.", "correct"),
    ("Evaluation result: the given answer is wrong.", "wrong"),
    ("Evaluation result: The given answer is Uncertain.", "uncertain"),
    ('the given answer is "correct"', "correct"),
    ("The given answer is correct. On second thought the given answer is wrong.", "wrong"),  # the last counts
    ("The given answer is incorrect.", "wrong"),
    ("The given answer is correctly computed but", None),  # whole words only
    ("The answer is correct.", None),
    ("", None),
])
def test_extract_label(text, label):
    assert extract_label(text) == label


def test_answers_match_and_normalize():
    assert answers_match("12", "12.0") and answers_match("(10 * 45)", "450") and answers_match("2.5", "5/2")
    assert answers_match("0.3333333", "1/3") and not answers_match("0.33", "1/3")
    assert not answers_match(None, "3") and not answers_match("3", None) and not answers_match("x", "x")
    assert normalize_answer(12) == "12" and normalize_answer(2.50) == "2.5" and normalize_answer("1/3") == "0.333333"
    assert normalize_answer(True) is None and normalize_answer(float("nan")) is None


# ------------------------------------------------------------------------------------------------ teacher data

CFG = TeacherConfig(k=2, m=2, max_new_tokens=8, eval_tokens=6, batch_size=2)


def test_teacher_data_is_seeded_resumable_and_shardable(talker, tmp_path):
    ps = make_problems(5, seed=0)
    ref = make_teacher_data(talker, ps, CFG, seed=3, out=tmp_path / "ref", progress=False)
    assert [r["index"] for r in ref] == list(range(5)) and [r["question"] for r in ref] == [p.question for p in ps]
    for r in ref:
        assert len(r["rationales"]) == len(r["rationale_answers"]) == len(r["rationale_correct"]) == 2
        assert len(r["rationale_finished"]) == 2 and r["answer"] == ps[r["index"]].answer
        assert [len(e) for e in r["evaluations"]] == [2, 2] and [len(e) for e in r["evaluation_labels"]] == [2, 2]
        assert all(e.startswith("Evaluation:") for ev in r["evaluations"] for e in ev)
    assert make_teacher_data(talker, ps, CFG, seed=3, progress=False) == ref  # seeded, no folder
    assert make_teacher_data(talker, ps, CFG, seed=4, progress=False) != ref
    assert make_teacher_data(talker, ps, CFG, seed=3, out=tmp_path / "ref", progress=False) == ref  # resumed: done
    path = tmp_path / "ref" / "teacher.jsonl"
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == list(range(5))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # two whole batches and a torn line
    assert make_teacher_data(talker, ps, CFG, seed=3, out=tmp_path / "ref", progress=False) == ref
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == list(range(5))
    parts = [make_teacher_data(talker, ps, CFG, seed=3, out=tmp_path / f"s{i}", shard=(i, 2), progress=False)
             for i in range(2)]
    assert sorted((r for p in parts for r in p), key=lambda r: r["index"]) == ref
    assert json.loads((tmp_path / "s1" / "shard.json").read_text())["stage"] == "distill_teacher"
    costs = json.loads((tmp_path / "s0" / "costs.json").read_text())
    assert costs["rows"] == 3 and set(costs["phases"]) == {"generation", "labelling"}
    assert costs["phases"]["labelling"]["generated_tokens"] > 0
    with measure_costs("pipeline", talker) as meter:  # a caller's meter: it counts, the folder gets no costs.json
        make_teacher_data(talker, ps[:2], CFG, seed=3, out=tmp_path / "metered", meter=meter, progress=False)
    assert meter.costs.phases["labelling"]["generated_tokens"] > 0 and meter.costs.rows == 2
    assert not (tmp_path / "metered" / "costs.json").exists()
    with pytest.raises(ValueError, match="other settings"):
        make_teacher_data(talker, ps, replace(CFG, k=3), seed=3, out=tmp_path / "ref", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        make_teacher_data(talker, ps[::-1], CFG, seed=3, out=tmp_path / "ref", progress=False)


class _ScriptedEngine:
    """Answers rationale prompts with a fixed chain of thought (and a self-written next question) and
    evaluation prompts with a verdict that depends on the seed's parity."""

    def __init__(self):
        self.calls: list[int] = []

    def generate(self, prompts, decoding, *, seed=0, **_):
        self.calls.append(len(prompts))
        out = []
        for p, s in zip(prompts, seed, strict=True):
            if p.endswith("Evaluation:"):
                text = ("It multiplies.\n\nEvaluation result: the given answer is correct." if s % 3 == 0 else
                        "It adds.\n\nEvaluation result: the given answer is wrong." if s % 3 == 1 else "Hmm.")
            elif "Sam has" in p:
                text = "Sam has 3 * 4 = 12. The answer is 12.\nQuestion: And 5 * 5? Answer: The answer is 25."
            else:
                text = "I am not sure."
            out.append(Generation(text, True, 5))
        return out


def test_teacher_rows_from_a_scripted_teacher(talker, monkeypatch):
    eng = _ScriptedEngine()
    monkeypatch.setattr(teacher_mod, "engine", lambda model: eng)
    ps = [Problem("Sam has 3 boxes of 4 pens. How many pens?", "12"), Problem("Sam has 3 boxes of 4 cups. How many "
                                                                          "cups?", "13"), Problem("Why?", "1")]
    rows = make_teacher_data(talker, ps, TeacherConfig(k=3, m=4, batch_size=2), progress=False)
    assert eng.calls == [6, 6, 6, 6, 6, 3, 6, 6]  # batch 0: 6 rationales, 24 evaluations in groups of 6; batch 1
    r0, r1, r2 = rows
    assert r0["rationales"] == ["Sam has 3 * 4 = 12. The answer is 12."] * 3  # cut at the self-written question
    assert r0["rationale_answers"] == ["12"] * 3 and r0["rationale_correct"] == [True] * 3
    assert r1["rationale_correct"] == [False] * 3 and r2["rationale_answers"] == [None] * 3
    assert r0["rationale_finished"] == [True] * 3
    labels = [x for r in rows for ev in r["evaluation_labels"] for x in ev]
    assert set(labels) == {"correct", "wrong", None} and len(labels) == 36
    assert r0["evaluations"][0][0].startswith("Evaluation:\n\nIt ")
    rd, sd = rationale_dataset(rows).to_dict(), self_eval_dataset(rows).to_dict()
    assert len(rd["question"]) == 6 and rd["rationale"][0] == "Sam has 3 * 4 = 12."
    assert rd["correct"] == [True] * 3 + [False] * 3
    assert len(sd["label"]) == sum(x is not None for x in labels)
    assert set(sd["evaluation"]) == {"Evaluation:\n\nIt multiplies.", "Evaluation:\n\nIt adds."}


def _row(index, gold, answers, labels):
    return {"index": index, "question": f"Q{index}", "answer": gold,
            "rationales": [f"Work. The answer is {a}." if a is not None else "no idea" for a in answers],
            "rationale_answers": answers, "rationale_correct": [answers_match(a, gold) for a in answers],
            "rationale_finished": [True] * len(answers),
            "evaluations": [[f"Evaluation:\n\nHmm.\n\nEvaluation result: the given answer is {x}." if x else "?"
                             for x in ls] for ls in labels],
            "evaluation_labels": labels}


HAND_ROWS = [
    # right, right, wrong: majority right
    _row(0, "5", ["5", "5", "4"], [["correct", "correct"], ["wrong", None], ["wrong", "uncertain"]]),
    # wrong, unread, right: the majority of the read ones is the first seen of equals ("6": wrong)
    _row(1, "7", ["6", None, "7"], [["correct", "correct"], [None, None], ["uncertain", "correct"]]),
]


def test_datasets_and_summary_from_hand_made_rows():
    rd = rationale_dataset(HAND_ROWS).to_dict()
    assert rd["source_index"] == [0, 0, 0, 1, 1] and rd["rationale_index"] == [0, 1, 2, 0, 2]
    assert rd["answer"] == ["5", "5", "4", "6", "7"] and rd["gold"] == ["5"] * 3 + ["7"] * 2
    assert rd["correct"] == [True, True, False, False, True] and rd["rationale"][0] == "Work."
    sd = self_eval_dataset(HAND_ROWS).to_dict()
    assert len(sd["label"]) == 9 and sd["label"].count("correct") == 5 and sd["evaluation"][0] == "Evaluation:\n\nHmm."
    assert list(sd) == ["question", "rationale", "label", "evaluation", "rationale_correct", "source_index",
                               "rationale_index", "evaluation_index"]
    assert sd["rationale"][0] == "Work. The answer is 5."
    s = teacher_summary(HAND_ROWS)
    assert (s["n_questions"], s["k"], s["m"]) == (2, 3, 2)
    assert s["rationale_accuracy"]["successes"] == 3 and s["rationale_accuracy"]["n"] == 6
    assert s["majority_vote_accuracy"]["rate"] == 0.5 and s["any_correct"]["rate"] == 1.0
    assert s["answer_extraction_rate"]["successes"] == 5 and s["label_parse_rate"]["successes"] == 9
    assert s["label_parse_rate"]["n"] == 12
    # agreement: q0 r0 correct,correct (2) ; r1 wrong on right (0) ; r2 wrong on wrong (1), uncertain (0);
    # q1 r0 correct,correct on wrong (0) ; r2 uncertain (0), correct on right (1)  -> 4 of 9 parsed
    assert s["self_eval_agreement"]["successes"] == 4 and s["self_eval_agreement"]["n"] == 9
    assert s["self_eval_agreement_all"]["n"] == 12
    lo, hi = s["self_eval_agreement"]["ci_low"], s["self_eval_agreement"]["ci_high"]
    assert lo < 4 / 9 < hi
    assert s["label_distribution"] == {"correct": 5, "wrong": 2, "uncertain": 2, "unparsed": 3}
    assert s["labels_by_gold"]["wrong_rationales"] == {"correct": 2, "wrong": 1, "uncertain": 1, "unparsed": 2}
    # per rationale (5 with a parsed label): q0 r0 correct/right yes, r1 wrong/right no, r2 wrong/wrong yes;
    # q1 r0 correct/wrong no, r2 uncertain (first seen of equals)/right no
    assert s["rationale_vote_agreement"]["successes"] == 2 and s["rationale_vote_agreement"]["n"] == 5
    assert s["yield"] == {"rationale_rows": 5, "correct_rationale_rows": 3, "self_eval_rows": 9,
                          "rationale_rows_per_question": 2.5, "correct_rationale_rows_per_question": 1.5,
                          "self_eval_rows_per_question": 4.5}
    empty = teacher_summary([])
    assert empty["rationale_accuracy"]["rate"] is None and len(rationale_dataset([])) == 0


def test_teacher_config_is_checked():
    with pytest.raises(ValueError, match="k must be"):
        TeacherConfig(k=0)
    with pytest.raises(ValueError, match="temperature"):
        TeacherConfig(temperature=0)
    with pytest.raises(ValueError, match="batch_size"):
        TeacherConfig(batch_size=True)
