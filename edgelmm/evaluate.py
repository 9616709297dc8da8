"""Held-out accuracy of a model or bundle on the synthetic multi-image set, per task and per skill.

The yardstick for quantization and backends: the same fixed samples (split "test", sample 0..n-1)
go through any Pipeline, answers are generated greedily and compared after normalisation. Chance is
reported as the majority baseline (always giving a task's most common answer), which is stricter
than a uniform guess for skewed answer sets such as the anomaly task's "no".
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from . import synthetic


@dataclass
class TaskScore:
    task: str
    skill: str
    correct: int
    total: int
    chance: float                  # share of the most common answer among these samples

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalReport:
    split: str
    samples: int
    tasks: list[TaskScore]
    seconds: float
    correct: list[bool] = field(default_factory=list)             # per sample, in index order
    mistakes: list[dict[str, Any]] = field(default_factory=list)   # a few, for a human to look at

    def skills(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for skill in synthetic.SKILLS:
            rows = [t for t in self.tasks if t.skill == skill]
            if rows:
                total = sum(t.total for t in rows)
                out[skill] = {"accuracy": sum(t.correct for t in rows) / total,
                              "chance": sum(t.chance * t.total for t in rows) / total, "samples": total}
        return out

    @property
    def accuracy(self) -> float:
        total = sum(t.total for t in self.tasks)
        return sum(t.correct for t in self.tasks) / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"split": self.split, "samples": self.samples, "accuracy": self.accuracy,
                "skills": self.skills(),
                "tasks": {t.task: {**asdict(t), "accuracy": t.accuracy} for t in self.tasks},
                "seconds": self.seconds, "mistakes": self.mistakes}

    def subset_accuracy(self, n: int) -> float:
        """Accuracy over the first n samples (a CI-sized subset of the same fixed set)."""
        return sum(self.correct[:n]) / min(n, len(self.correct))


def evaluate(pipeline, samples: int = 900, split: str = "test", max_new_tokens: int = 12,
             on_progress: Callable[[int, int], None] | None = None, keep_mistakes: int = 8) -> EvalReport:
    """Answer `samples` held-out samples (tasks take turns, so every task gets samples/9)."""
    per_task: dict[str, list[tuple[bool, str]]] = {}
    correct: list[bool] = []
    mistakes: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in range(samples):
        s = synthetic.make_sample(split, i)
        g = pipeline.generate(s.messages, s.images, max_new_tokens=max_new_tokens)
        ok = synthetic.normalise_answer(g.text) == synthetic.normalise_answer(s.answer)
        per_task.setdefault(s.task, []).append((ok, s.answer))
        correct.append(ok)
        if not ok and len(mistakes) < keep_mistakes:
            mistakes.append({"index": i, "task": s.task, "expected": s.answer, "got": g.text})
        if on_progress:
            on_progress(i + 1, samples)
    scores = []
    for task in synthetic.TASKS:
        rows = per_task.get(task.name)
        if not rows:
            continue
        majority = Counter(a for _, a in rows).most_common(1)[0][1] / len(rows)
        scores.append(TaskScore(task.name, task.skill, sum(ok for ok, _ in rows), len(rows), majority))
    return EvalReport(split, samples, scores, time.perf_counter() - t0, correct, mistakes)


def format_table(report: EvalReport) -> str:
    """The per-skill table as Markdown (used in the model card and notes)."""
    lines = ["| skill | tasks | accuracy | chance (majority answer) | samples |", "|---|---|---|---|---|"]
    skills = report.skills()
    for skill, row in skills.items():
        tasks = ", ".join(t.task for t in report.tasks if t.skill == skill)
        lines.append(f"| {skill} | {tasks} | {row['accuracy']:.1%} | {row['chance']:.1%} | {row['samples']} |")
    lines.append(f"| **overall** | | **{report.accuracy:.1%}** | | {report.samples} |")
    return "\n".join(lines)
