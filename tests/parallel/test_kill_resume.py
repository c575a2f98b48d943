"""Kill and resume: a real job is SIGKILLed mid-training (after a checkpoint), relaunched with the same
command, and its loss trajectory from the checkpoint on equals the uninterrupted run's exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.callbacks import read_metrics

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STEPS = 30
COMMON = [
    "data.task.num_train=256", "data.task.num_val=32", "train.batch_size=8", "train.eval_batches=1",
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", f"train.steps={STEPS}", "train.eval_every=15",
    "train.log_every=1", "train.checkpoint_every=10", "tracking.enabled=false", "train.device=cpu",
]
LAYOUTS = {"dp1": ["launch.nproc=1"], "dp2-zero1": ["launch.nproc=2", "parallel.zero_stage=1"]}


def command(shards: Path, layout: list[str]) -> list[str]:
    return [sys.executable, "-m", "pretrain.launch", "--config", str(QUICKSTART), "--set", *COMMON,
            f"data.shard_dir={shards}", *layout]


def env() -> dict[str, str]:
    # one BLAS/OpenMP thread per process: losses are compared bit for bit across separate runs, and a
    # thread count that differs between runs changes summation order (a loaded CI run once saw dp1's
    # step-11 loss 1e-7 off, as the pipeline test saw for weights)
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sigkill_then_relaunch_continues_exactly(name, tmp_path):
    shards = tmp_path / "shards"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    ref = subprocess.run(command(shards, LAYOUTS[name]), cwd=whole, env=env(), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    (ref_dir,) = (whole / "runs" / "quickstart").iterdir()
    reference = read_metrics(ref_dir)

    job = subprocess.Popen(command(shards, LAYOUTS[name]), cwd=killed, env=env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_root = killed / "runs" / "quickstart"
    deadline = time.monotonic() + 300
    while True:  # wait for the step-10 checkpoint and a few steps past it, then kill every process
        assert job.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline
        latest = list(run_root.glob("*/checkpoints/latest"))
        if latest and latest[0].read_text().strip() == "step_0000010" and max(read_metrics(latest[0].parents[1]),
                                                                                default=0) >= 12:
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    (run_dir,) = run_root.iterdir()
    killed_at = max(read_metrics(run_dir))
    assert 12 <= killed_at < STEPS

    again = subprocess.run(command(shards, LAYOUTS[name]), cwd=killed, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step_0000010" in again.stderr
    resumed = read_metrics(run_dir)  # steps 11.. were logged twice: the relaunch's lines win
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert resumed[step]["train/loss"] == reference[step]["train/loss"], (name, step)
        # the reported norm is a diagnostic: DeepSpeed ZeRO-1's was once seen 1 ulp off after a resume
        # on a heavily loaded machine while every loss stayed identical; the losses are the exact check
        assert resumed[step]["train/grad_norm"] == pytest.approx(reference[step]["train/grad_norm"], rel=1e-6), \
            (name, step)
    assert read_metrics(run_dir, "eval")[STEPS]["val/nll"] == read_metrics(ref_dir, "eval")[STEPS]["val/nll"]
