"""Seeded 9x9 Sudoku generator with unique solutions, a bitmask solver, a checker and a CSV reader.

Grids are lists of 81 ints in row-major order, 0 for a blank cell, 1..9 for a digit.

Generation (why it looks like this):
1. A full grid comes from a randomized MRV backtracking solve of an empty grid whose three
   diagonal boxes were filled with random permutations (they constrain each other not at all).
   Shuffling one base pattern would be faster still but every grid would then be isomorphic to
   that pattern, a regularity a model could learn instead of Sudoku.
2. Cells are blanked in a random order straight down to the target number of givens, then the
   puzzle is repaired: while a second solution exists, one cell where that solution differs from
   the full grid is restored (and locked, so the repair cannot undo itself), and one more not-yet-
   blanked cell from the random order is blanked to get back to the target. Each round costs one
   solver call; at 40 givens most puzzles need one or two. If the order runs out (low targets, near
   minimal puzzles), a greedy pass on the same grid blanks cells one at a time and undoes any blank
   that admits a second solution (the undone cell is one where the two solutions differ); if that
   also stops above the target, the generator starts over from a new grid. Measured on one core:
   ~0.3 ms per puzzle at 40 givens, ~10 ms at 26, ~30 ms at 24; below ~23 it rarely succeeds.
The solver counts solutions up to a limit with most-constrained-cell-first backtracking on row,
column and box bitmasks, which proves uniqueness of these puzzles in well under a millisecond.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from pathlib import Path

Grid = list[int]

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_FULL = 0x1FF
_POP = [bin(m).count("1") for m in range(512)]
_BITS = [[1 << d for d in range(9) if m >> d & 1] for m in range(512)]  # candidate bits of a mask
_DIGIT = {1 << d: d + 1 for d in range(9)}

MIN_GIVENS = 17  # no 9x9 Sudoku with fewer clues has a unique solution (McGuire et al., 2012)
MAX_RESTARTS = 100


def _search(cells: Grid, limit: int, rng: random.Random | None = None) -> list[Grid]:
    """Up to `limit` solutions of `cells` (not modified); [] if none or the givens clash."""
    cells = list(cells)
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    empties = []
    for i, v in enumerate(cells):
        if not v:
            empties.append(i)
            continue
        bit = 1 << (v - 1)
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        if (rows[r] | cols[c] | boxes[b]) & bit:
            return []
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
    n = len(empties)
    solutions: list[Grid] = []

    def rec(k: int) -> bool:
        if k == n:
            solutions.append(list(cells))
            return len(solutions) >= limit
        best, best_count, best_mask = k, 10, 0
        for j in range(k, n):  # most constrained cell first (MRV)
            i = empties[j]
            m = ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) & _FULL
            cnt = _POP[m]
            if cnt < best_count:
                best, best_count, best_mask = j, cnt, m
                if cnt <= 1:
                    break
        if best_count == 0:
            return False
        empties[k], empties[best] = empties[best], empties[k]
        i = empties[k]
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        bits = _BITS[best_mask]
        if rng is not None and len(bits) > 1:
            bits = list(bits)
            rng.shuffle(bits)
        for bit in bits:
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cells[i] = _DIGIT[bit]
            if rec(k + 1):
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        cells[i] = 0
        return False

    rec(0)
    return solutions


def _check_shape(grid: Grid) -> Grid:
    grid = [int(v) for v in grid]
    if len(grid) != 81 or any(not 0 <= v <= 9 for v in grid):
        raise ValueError("a Sudoku grid is 81 cells with values 0 (blank) to 9")
    return grid


def count_solutions(grid: Grid, limit: int = 2) -> int:
    """Number of solutions, counted up to `limit` (2 is enough to decide uniqueness)."""
    return len(_search(_check_shape(grid), limit))


def solve(grid: Grid) -> Grid | None:
    """One solution of `grid`, or None if it has none."""
    sols = _search(_check_shape(grid), 1)
    return sols[0] if sols else None


def is_valid_solution(grid: Grid) -> bool:
    """True if every cell holds 1..9 and each row, column and box holds each digit once."""
    if len(grid) != 81 or any(not isinstance(v, int) or not 1 <= v <= 9 for v in grid):
        return False
    for unit_of in (_ROW, _COL, _BOX):
        seen = [0] * 9
        for i, v in enumerate(grid):
            seen[unit_of[i]] |= 1 << (v - 1)
        if any(m != _FULL for m in seen):
            return False
    return True


def unit_duplicates(grid: Grid) -> dict[str, int]:
    """Constraint violations of a (possibly wrong) filled grid: for each row, column and box, the
    digits beyond the first of each value (a unit holding 5, 5, 5 counts 2); blanks (0) count
    nothing. {"row": .., "col": .., "box": .., "total": ..}; a valid solution has total 0."""
    grid = _check_shape(grid)
    out = {}
    for name, unit_of in (("row", _ROW), ("col", _COL), ("box", _BOX)):
        counts = [[0] * 10 for _ in range(9)]
        for i, v in enumerate(grid):
            counts[unit_of[i]][v] += 1
        out[name] = sum(max(c - 1, 0) for unit in counts for c in unit[1:])
    out["total"] = out["row"] + out["col"] + out["box"]
    return out


def legal_digit_accuracy(puzzle: Grid, solution: Grid) -> float:
    """Expected fraction of blank cells right when each gets a uniformly random digit among the
    candidates its row, column and box allow given the puzzle's clues (a reference for cell accuracy:
    one step of elimination, no search; ~0.51 at 40 givens, against 1/9 for a uniform digit)."""
    used = [0] * 27  # digit bitmasks of the 9 rows, 9 columns, 9 boxes
    for i, v in enumerate(puzzle):
        if v:
            for u in (_ROW[i], 9 + _COL[i], 18 + _BOX[i]):
                used[u] |= 1 << (v - 1)
    blanks = [i for i, v in enumerate(puzzle) if not v]
    total = 0.0
    for i in blanks:
        free = _FULL & ~(used[_ROW[i]] | used[9 + _COL[i]] | used[18 + _BOX[i]])
        if free >> (solution[i] - 1) & 1:
            total += 1.0 / _POP[free]
    return total / max(len(blanks), 1)


def random_full_grid(rng: random.Random) -> Grid:
    """A random complete grid (see the module docstring for why not a shuffled base pattern)."""
    cells = [0] * 81
    for box in (0, 4, 8):
        digits = list(range(1, 10))
        rng.shuffle(digits)
        r0, c0 = (box // 3) * 3, (box % 3) * 3
        for k, d in enumerate(digits):
            cells[(r0 + k // 3) * 9 + c0 + k % 3] = d
    sols = _search(cells, 1, rng)
    assert sols, "three independent diagonal boxes always extend to a full grid"
    return sols[0]


def generate(rng: random.Random, givens: int = 40) -> tuple[Grid, Grid]:
    """(puzzle, solution): a puzzle with exactly `givens` clues and a unique solution."""
    if not MIN_GIVENS <= givens <= 81:
        raise ValueError(f"givens={givens}: a unique 9x9 Sudoku needs {MIN_GIVENS} to 81 clues")
    for _ in range(MAX_RESTARTS):
        solution = random_full_grid(rng)
        puzzle = _dig(solution, givens, rng)
        if puzzle is None:
            puzzle = _greedy(solution, givens, rng)
        if puzzle is not None:
            return puzzle, solution
    raise RuntimeError(
        f"no unique puzzle with {givens} givens after {MAX_RESTARTS} grids; unique puzzles this sparse "
        "are rare (greedy digging stops at ~23-26 clues); raise data.task.sudoku.givens"
    )


def _dig(solution: Grid, givens: int, rng: random.Random) -> Grid | None:
    """Blank down to `givens` clues, then repair until unique; None if this grid's order ran out."""
    order = list(range(81))
    rng.shuffle(order)
    n_blank = 81 - givens
    puzzle = list(solution)
    for i in order[:n_blank]:
        puzzle[i] = 0
    spare = order[n_blank:]  # givens that may still be blanked, in random order
    while True:
        sols = _search(puzzle, 2)
        if len(sols) == 1:
            return puzzle
        other = sols[0] if sols[0] != solution else sols[1]
        differing = [i for i in range(81) if other[i] != solution[i]]
        restored = rng.choice(differing)  # blank in `puzzle`: restoring it rules `other` out
        puzzle[restored] = solution[restored]
        if not spare:
            return None
        puzzle[spare.pop()] = 0


def _greedy(solution: Grid, givens: int, rng: random.Random) -> Grid | None:
    """Blank cells one at a time, keeping a blank only if the solution stays unique.

    Slower than `_dig` (one solver call per cell) but reaches lower targets: a removal that
    admits a second solution is undone, and the removed cell is one where the two solutions differ.
    """
    order = list(range(81))
    rng.shuffle(order)
    puzzle = list(solution)
    n_givens = 81
    for i in order:
        puzzle[i] = 0
        if len(_search(puzzle, 2)) == 1:
            n_givens -= 1
            if n_givens == givens:
                return puzzle
        else:
            puzzle[i] = solution[i]
    return None


def to_text(grid: Grid, blank: str = ".") -> str:
    return "".join(str(v) if v else blank for v in grid)


def from_text(text: str) -> Grid:
    """81 characters, digits 1..9, and 0 or '.' for a blank."""
    text = text.strip()
    if len(text) != 81 or any(ch not in "0123456789." for ch in text):
        raise ValueError(f"expected 81 characters of 0-9 or '.', got {text[:90]!r}")
    return [0 if ch == "." else int(ch) for ch in text]


def document_text(puzzle: Grid, solution: Grid) -> str:
    """`<puzzle, '.' for blank>=<solution>`: 163 characters."""
    return f"{to_text(puzzle)}={to_text(solution)}"


def read_csv(path: str | Path) -> Iterator[tuple[Grid, Grid]]:
    """(puzzle, solution) pairs from the common public format: a header with `quizzes,solutions`."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"quizzes", "solutions"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: expected columns quizzes,solutions; missing {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                yield from_text(row["quizzes"]), from_text(row["solutions"])
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
