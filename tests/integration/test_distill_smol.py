"""Mind's Mirror's teacher data on the embedded SmolLM2-135M-Instruct (a weak teacher: rates are recorded, not
asserted)."""

from __future__ import annotations

import json
import time

import pytest

from icon2_lens.distill.problems import make_problems
from icon2_lens.distill.teacher import (
    TeacherConfig,
    make_teacher_data,
    rationale_dataset,
    self_eval_dataset,
    teacher_summary,
)

pytestmark = pytest.mark.integration


def test_teacher_data_on_smol(smol, tmp_path, record_property):
    problems = make_problems(2, seed=0)
    cfg = TeacherConfig(k=2, m=1, max_new_tokens=96, eval_tokens=64, batch_size=2)
    t0 = time.perf_counter()
    rows = make_teacher_data(smol, problems, cfg, seed=0, out=tmp_path / "teacher", progress=False)
    seconds = time.perf_counter() - t0
    assert [r["question"] for r in rows] == [p.question for p in problems]
    assert all(len(r["rationales"]) == 2 and [len(e) for e in r["evaluations"]] == [1, 1] for r in rows)
    assert all(t.strip() for r in rows for t in r["rationales"])  # the teacher writes something
    summary = teacher_summary(rows)
    assert summary["yield"]["rationale_rows"] == len(rationale_dataset(rows))
    assert summary["yield"]["self_eval_rows"] == len(self_eval_dataset(rows))
    costs = json.loads((tmp_path / "teacher" / "costs.json").read_text())
    assert set(costs["phases"]) == {"generation", "labelling"}
    rates = {"answer_extraction_rate": summary["answer_extraction_rate"]["rate"],
             "label_parse_rate": summary["label_parse_rate"]["rate"],
             "rationale_accuracy": summary["rationale_accuracy"]["rate"],
             "generated_tokens": costs["generated_tokens"], "seconds": round(seconds, 1)}
    for key, value in rates.items():
        record_property(key, value)
    print("SmolLM2 teacher:", json.dumps(rates))
    for r in rows:
        print(json.dumps({k: r[k] for k in ("answer", "rationales", "rationale_answers", "evaluations",
                                             "evaluation_labels")}, indent=1))
