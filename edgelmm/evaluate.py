"""Held-out accuracy of a model or bundle on the synthetic multi-image set, per task and per skill.

The yardstick for quantization and backends: the same fixed samples (split "test", sample 0..n-1)
go through any Pipeline, answers are generated greedily and compared after normalisation. Chance is
reported as the majority baseline (always giving a task's most common answer), which is stricter
than a uniform guess for skewed answer sets such as the anomaly task's "no".
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

from . import synthetic
from .options import check_int


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


@dataclass(frozen=True)
class Outcome:
    index: int
    task: str
    expected: str
    got: str

    @property
    def correct(self) -> bool:
        return synthetic.normalise_answer(self.got) == synthetic.normalise_answer(self.expected)


@dataclass
class EvalReport:
    split: str
    outcomes: list[Outcome]        # per sample, in index order
    seconds: float

    @property
    def samples(self) -> int:
        return len(self.outcomes)

    @property
    def tasks(self) -> list[TaskScore]:
        scores = []
        for task in synthetic.TASKS:
            rows = [o for o in self.outcomes if o.task == task.name]
            if rows:
                majority = Counter(o.expected for o in rows).most_common(1)[0][1] / len(rows)
                scores.append(TaskScore(task.name, task.skill, sum(o.correct for o in rows), len(rows), majority))
        return scores

    def skills(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        tasks = self.tasks
        for skill in synthetic.SKILLS:
            rows = [t for t in tasks if t.skill == skill]
            if rows:
                total = sum(t.total for t in rows)
                out[skill] = {"accuracy": sum(t.correct for t in rows) / total,
                              "chance": sum(t.chance * t.total for t in rows) / total, "samples": total}
        return out

    @property
    def accuracy(self) -> float:
        return sum(o.correct for o in self.outcomes) / self.samples if self.outcomes else 0.0

    def mistakes(self, limit: int = 8) -> list[dict[str, Any]]:
        """A few wrong answers, for a human to look at."""
        return [asdict(o) for o in self.outcomes if not o.correct][:limit]

    def subset(self, n: int) -> "EvalReport":
        """The report over the first n samples (a CI-sized subset of the same fixed set)."""
        return EvalReport(self.split, self.outcomes[:n], self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"split": self.split, "samples": self.samples, "accuracy": self.accuracy,
                "skills": self.skills(),
                "tasks": {t.task: {**asdict(t), "accuracy": t.accuracy} for t in self.tasks},
                "seconds": self.seconds, "mistakes": self.mistakes()}


def check_samples(samples, name: str = "samples") -> None:
    """At least one sample: with none, the report would say "overall 0.0%" and look like a result."""
    check_int(name, samples, 1)


def evaluate(pipeline, samples: int = 900, split: str = "test", max_new_tokens: int = 12,
             on_progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Answer `samples` held-out samples (tasks take turns, so every task gets samples/9)."""
    check_samples(samples)
    outcomes = []
    t0 = time.perf_counter()
    for i in range(samples):
        s = synthetic.make_sample(split, i)
        g = pipeline.generate(s.messages, s.images, max_new_tokens=max_new_tokens)
        outcomes.append(Outcome(i, s.task, s.answer, g.text))
        if on_progress:
            on_progress(i + 1, samples)
    return EvalReport(split, outcomes, time.perf_counter() - t0)


def format_table(report: EvalReport) -> str:
    """The per-skill table as Markdown (used in the model card and notes)."""
    lines = ["| skill | tasks | accuracy | chance (majority answer) | samples |", "|---|---|---|---|---|"]
    skills = report.skills()
    for skill, row in skills.items():
        tasks = ", ".join(t.task for t in report.tasks if t.skill == skill)
        lines.append(f"| {skill} | {tasks} | {row['accuracy']:.1%} | {row['chance']:.1%} | {row['samples']} |")
    lines.append(f"| **overall** | | **{report.accuracy:.1%}** | | {report.samples} |")
    return "\n".join(lines)
