"""Mind's Mirror (Liu et al., NAACL 2024, arXiv 2311.09214): distil several chains of thought and the teacher's
self-evaluation of each into a student.

- `icon2_lens.distill.problems`: offline arithmetic word problems with verifiable answers, and a user's JSONL.
- `icon2_lens.distill.extract`: the paper's answer, rationale and label extraction rules (pure).
- `icon2_lens.distill.teacher`: k rationales and m self-evaluations per question from any model, resumable and
  shardable; the rationale and self-evaluation datasets; the teacher's accuracy and self-evaluation agreement.
- `icon2_lens.distill.probe`: this library's addition, a probe on the teacher's residual stream at the answer
  token that separates right from wrong rationales.
- `icon2_lens.distill.student`: the two-task student (``predict:`` -> answer, ``explain:`` -> rationale, alpha 0.5)
  on TRL, self-evaluation first, and its accuracy.
"""

from __future__ import annotations

from .extract import answers_match, extract_answer, extract_label, extract_rationale
from .probe import AnswerProbe
from .problems import Problem, load_problems, make_problems, split_problems
from .student import StudentConfig, StudentResult, self_eval_accuracy, single_rationale, student_accuracy, train_student
from .teacher import TeacherConfig, make_teacher_data, rationale_dataset, self_eval_dataset, teacher_summary

__all__ = ["Problem", "make_problems", "split_problems", "load_problems", "extract_answer", "extract_rationale",
           "extract_label", "answers_match", "TeacherConfig", "make_teacher_data", "rationale_dataset",
           "self_eval_dataset", "teacher_summary", "AnswerProbe", "StudentConfig", "StudentResult", "train_student",
           "single_rationale", "student_accuracy", "self_eval_accuracy"]
