"""bench/seed001_sweep.py plans product commands only, skips finished runs and resumes the rest
(checked without training: the plan, and run folders written by hand as the trainer writes them)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("seed001_sweep", REPO / "bench" / "seed001_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_plan_covers_arms_seeds_and_learning_rates(sweep, tmp_path):
    runs = sweep.plan(["uniform", "bell", "beta_elbo", "ar"], seeds=[0, 1], ar_seeds=[0], tokens=1e6, alt_lr=1e-3,
                      out=tmp_path)
    names = [r.run_name for r in runs]
    assert len(names) == len(set(names)) == 2 * (2 + 2 + 1) + 1  # uniform, bell at two lrs; beta_elbo; 1 AR
    assert names[:6] == ["uniform-lr0.002-s0", "uniform-lr0.001-s0", "bell-lr0.002-s0", "bell-lr0.001-s0",
                         "beta_elbo-lr0.002-s0", "ar-lr0.002-s0"]  # seed-major: every arm has seed 0 first
    steps = math.ceil(1e6 / (32 * 256))
    for r in runs:
        assert r.command[1:3] == ["-m", "pretrain.launch"] and not r.problem, r.problem  # the product's command
        assert r.steps == steps and f"train.steps={steps}" in r.command
        assert f"launch.run_name={r.run_name}" in r.command and f"seed={r.seed}" in r.command
        assert r.run_dir == tmp_path / sweep.EXPERIMENT / r.run_name
        assert f"tracking.uri=sqlite:///{tmp_path}/mlruns.db" in r.command  # one store, one experiment
    elbo = next(r for r in runs if r.arm == "beta_elbo")
    assert "diffusion.weighting=elbo" in elbo.command and "diffusion.bell.b=1.5" in elbo.command


def _write_metrics(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def test_finished_runs_are_skipped_and_the_dry_run_says_so(sweep, tmp_path, capsys):
    args = ["--arms", "uniform", "--seeds", "0", "1", "2", "--ar-seeds", "--tokens", "1e6", "--out", str(tmp_path)]
    steps = math.ceil(1e6 / (32 * 256))
    done, partial, cut = (tmp_path / sweep.EXPERIMENT / f"uniform-lr0.002-s{s}" for s in (0, 1, 2))
    _write_metrics(done, [{"kind": "eval", "step": 0, "val/nll": 4.9}, {"kind": "train", "step": steps, "train/loss": 2},
                          {"kind": "eval", "step": steps, "val/nll": 2.1}])
    _write_metrics(partial, [{"kind": "eval", "step": 0, "val/nll": 4.9}, {"kind": "eval", "step": 60, "val/nll": 3.0}])
    _write_metrics(cut, [{"kind": "eval", "step": 0, "val/nll": 4.9}], tail='{"kind": "eval", "step": ')  # killed mid-line
    runs = sweep.plan(["uniform"], [0, 1, 2], [], 1e6, 1e-3, tmp_path)
    assert [r.finished for r in runs if "lr0.002" in r.run_name] == [True, False, False]
    assert not any(r.finished for r in runs if "lr0.001" in r.run_name)
    assert sweep.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs: 1 finished, 5 to train" in out
    assert out.count("[done]") == 1 and out.count("[todo]") == 5 and "launch.run_name=uniform-lr0.002-s0" in out
    assert "-m data_pipeline.build" in out and "-m pretrain.compare" in out and "--headline" in out
    # a larger budget extends the finished run: it is no longer done
    more = sweep.plan(["uniform"], [0], [], 2e6, 1e-3, tmp_path)
    assert not more[0].finished and more[0].run_dir == done


def test_an_arm_the_config_refuses_is_reported_not_run(sweep, tmp_path, monkeypatch):
    bad = sweep.Arm("elbo_lognormal", "char_bell", ("diffusion.weighting=elbo",))  # logit-normal + elbo: refused
    monkeypatch.setattr(sweep, "ARMS", (*sweep.ARMS, bad))
    (run,) = sweep.plan(["elbo_lognormal"], [0], [], None, 1e-3, tmp_path)
    assert "diffusion.weighting" in run.problem and run.steps == 3700


def test_runs_in_parallel_get_their_share_of_threads_and_their_own_logs(sweep, tmp_path, monkeypatch):
    """--jobs 2: each run's output goes to OUT/logs/RUN.log, with cores // 2 torch threads (an
    explicit OMP_NUM_THREADS wins), and a failed run's exit code is the sweep's."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 4, raising=False)

    def run(name, code):
        cmd = [sys.executable, "-c", f"import os, sys; print('{name}', os.environ['OMP_NUM_THREADS']); sys.exit({code})"]
        return sweep.Run("uniform", 0, 2e-3, name, cmd, 1, tmp_path / name)

    ok = [run("a", 0), run("b", 0), run("c", 0)]
    assert sweep.train_all(ok, 2, tmp_path) == 0
    assert [(tmp_path / "logs" / f"{n}.log").read_text().split() for n in "abc"] == [[n, "2"] for n in "abc"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep.train_all([run("d", 0), run("e", 3)], 2, tmp_path) == 3
    assert (tmp_path / "logs" / "d.log").read_text().split() == ["d", "1"]
