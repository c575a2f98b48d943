"""Task generators: deterministic, fixed-length documents, targets that the task's own checks accept."""

import dataclasses

import numpy as np
import pytest

from data_pipeline.config import PathfindingTaskConfig, TaskConfig
from data_pipeline.tasks import get_task, task_names
from data_pipeline.tasks.linreg import Codec, LinRegTask
from data_pipeline.tasks.pathfinding import PathfindingTask
from data_pipeline.tokenizer import CharTokenizer


def test_registry_and_vocabulary():
    assert {"sudoku", "linreg", "pathfinding"} <= set(task_names())
    cfg = TaskConfig()
    for name in ("sudoku", "linreg", "pathfinding"):
        task = get_task(name)
        tok = CharTokenizer(task.symbols)
        ex = task.example("train", 0, 7, cfg)
        assert ex.text == task.example("train", 0, 7, cfg).text  # deterministic
        assert ex.text != task.example("val", 0, 7, cfg).text  # splits differ
        assert tok.decode(tok.encode(ex.text)) == ex.text
        prompt, answer = task.split_document(ex.text)
        assert (prompt, answer) == (ex.prompt, ex.answer) and prompt.endswith(task.separator)
        docs = list(task.documents("val", 3, 7, cfg))
        assert [d.text for d in docs] == [e.text for e in task.examples("val", 3, 7, cfg)]


@pytest.mark.parametrize("name", ["linreg", "pathfinding", "sudoku"])
def test_fixed_length_and_reference_scores_perfectly(name):
    task, cfg = get_task(name), TaskConfig()
    exs = list(task.examples("val", 40, 3, cfg))
    assert len({len(e.prompt) for e in exs}) == 1 and len({len(e.answer) for e in exs}) == 1
    agg = task.aggregate([task.score(e, e.answer) for e in exs])
    assert agg[task.headline] == (1.0 if task.higher_is_better else agg[task.headline])
    if name == "sudoku":
        assert agg["cell_acc"] == 1.0


def test_regression_targets_match_w_dot_x():
    cfg = TaskConfig()
    cfg.linreg = dataclasses.replace(cfg.linreg, noise=0.0)
    task = LinRegTask()
    codec = Codec(cfg.linreg.levels, cfg.linreg.value_range)
    for i in range(50):
        ex = task.example("train", i, 0, cfg)
        X, y, xq = task.parse_prompt(ex.prompt, codec)
        w = np.array(ex.meta["w"])
        assert X.shape == (cfg.linreg.num_points, cfg.linreg.dim)
        assert np.allclose(y, np.clip(X @ w, -2, 2), atol=codec.step / 2 + 1e-9)  # quantised w.x
        assert abs(codec.decode(ex.answer) - float(np.clip(xq @ w, -2, 2))) <= codec.step / 2 + 1e-9
        assert ex.meta["y"] == pytest.approx(float(xq @ w))
    s = task.score(ex, ex.answer)
    assert s["mse"] <= (codec.step / 2) ** 2 + 1e-12 and s["valid"] == 1.0
    assert task.score(ex, "?")["valid"] == 0.0


@pytest.mark.parametrize("graph", ["random", "star"])
def test_every_path_target_is_valid(graph):
    cfg = TaskConfig(pathfinding=PathfindingTaskConfig(graph=graph))
    task = PathfindingTask()
    for ex in task.examples("train", 200, 1, cfg):
        valid, length = task.check_path(ex.prompt, ex.answer)
        assert valid and length == ex.meta["shortest"]
        edges, s, g = task.parse_prompt(ex.prompt)
        if graph == "star":
            assert length == cfg.pathfinding.star_arm
        else:
            assert cfg.pathfinding.min_path <= length <= cfg.pathfinding.max_path
            assert len(edges) == cfg.pathfinding.edges


def test_path_checker_rejects_bad_paths():
    cfg = TaskConfig()
    task = PathfindingTask()
    ex = task.example("val", 0, 0, cfg)
    path = ex.answer.rstrip(".")
    edges, s, g = task.parse_prompt(ex.prompt)
    assert not task.check_path(ex.prompt, path[:-1].ljust(len(ex.answer), "."))[0]  # stops short of g
    assert not task.check_path(ex.prompt, (path + path[-2] + path[-1])[: len(ex.answer)])[0]  # repeats
    non_neighbour = next(c for c in set("".join(ex.prompt.split("/")[0].split(","))) - {s, g}
                         if frozenset((s, c)) not in edges)
    assert not task.check_path(ex.prompt, (s + non_neighbour + g).ljust(len(ex.answer), "."))[0]
    assert task.score(ex, "." * len(ex.answer)) == {"valid": 0.0, "optimal": 0.0, "exact": 0.0}


def test_sudoku_legal_digit_reference():
    """The reference accuracy of a random allowed digit: exact on hand-made cases (a single blank
    has one candidate, an empty grid nine everywhere), and far above a uniform digit's 1/9 on generated
    puzzles, far below solving."""
    from data_pipeline.tasks import sudoku

    task, cfg = get_task("sudoku"), TaskConfig()
    ex = task.example("val", 0, 0, cfg)
    solution = sudoku.from_text(ex.answer)
    one_blank = list(solution)
    one_blank[0] = 0  # its row, column and box hold the eight other digits
    assert sudoku.legal_digit_accuracy(one_blank, solution) == 1.0
    assert sudoku.legal_digit_accuracy([0] * 81, solution) == pytest.approx(1 / 9)  # no clue: 9 candidates each
    refs = [task.score(e, e.answer)["legal_digit_acc"] for e in task.examples("val", 30, 0, cfg)]
    assert 0.3 < sum(refs) / len(refs) < 0.8


def test_sudoku_score():
    task, cfg = get_task("sudoku"), TaskConfig()
    ex = task.example("val", 0, 0, cfg)
    wrong = ("1" if ex.answer[0] != "1" else "2") + ex.answer[1:]
    s = task.score(ex, wrong)
    assert s["solved"] == 0.0 and s["cell_acc"] >= 0.9
