"""Built-in task generators (source `task:NAME`): seeded, so a build is reproducible.

A task owns its vocabulary (`Task.symbols`, the characters its documents use) and a generator of
documents per split. Train and validation documents come from different seeds derived from
`TaskConfig.seed` and the split name, so the two splits never share a generator stream.

Every task document is `prompt + answer` (the prompt ends at the task's `separator`); `example()`
regenerates any one instance with what scoring needs, and `score(example, generated_answer)` gives
its metrics (see base.py). Tasks: sudoku, linreg (linreg.py), pathfinding (pathfinding.py).
"""

from __future__ import annotations

import random
from typing import Protocol

from data_pipeline.tasks import sudoku
from data_pipeline.tasks.base import Example, TaskBase, derive_seed  # noqa: F401  (re-exported)
from data_pipeline.tasks.linreg import LinRegTask
from data_pipeline.tasks.pathfinding import PathfindingTask


class Task(Protocol):
    name: str
    symbols: str  # every character a document of this task may contain
    separator: str  # the prompt ends at its first occurrence; the answer follows
    headline: str  # the metric a bench table reports
    higher_is_better: bool

    def documents(self, split: str, n: int, seed: int, cfg): ...
    def example(self, split: str, i: int, seed: int, cfg) -> Example: ...
    def examples(self, split: str, n: int, seed: int, cfg): ...
    def score(self, example: Example, generated: str) -> dict[str, float]: ...
    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]: ...


class SudokuTask(TaskBase):
    """`<81 chars puzzle, '.' blank>=<81 chars solution>`, unique solutions, `cfg.sudoku.givens` clues.

    Metrics: `solved` (the answer is a valid grid that keeps every given), `cell_acc` (fraction of
    the blank cells filled with the solution's digit). Reference, from the puzzle alone:
    `legal_digit_acc`, the expected cell accuracy of a uniformly random digit among those the cell's
    row, column and box still allow (one step of elimination; a uniform digit gives 1/9)."""

    name = "sudoku"
    symbols = "0123456789.="
    separator = "="
    headline = "solved"
    higher_is_better = True

    def make_example(self, rng: random.Random, cfg) -> Example:
        puzzle, solution = sudoku.generate(rng, cfg.sudoku.givens)
        return Example(prompt=sudoku.to_text(puzzle) + "=", answer=sudoku.to_text(solution))

    def score(self, example: Example, generated: str) -> dict[str, float]:
        puzzle = sudoku.from_text(example.prompt[:81])
        blanks = [i for i, v in enumerate(puzzle) if not v]
        cells = [int(ch) if ch in "123456789" else 0 for ch in generated[:81].ljust(81, "0")]
        keeps_givens = all(cells[i] == v for i, v in enumerate(puzzle) if v)
        correct = sum(generated[i] == example.answer[i] for i in blanks if i < len(generated))
        return {"solved": float(len(generated) == 81 and keeps_givens and sudoku.is_valid_solution(cells)),
                "cell_acc": correct / max(len(blanks), 1),
                "legal_digit_acc": sudoku.legal_digit_accuracy(puzzle, sudoku.from_text(example.answer))}


_TASKS: dict[str, Task] = {"sudoku": SudokuTask(), "linreg": LinRegTask(), "pathfinding": PathfindingTask()}


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(_TASKS))}") from None


def task_names() -> list[str]:
    return sorted(_TASKS)
