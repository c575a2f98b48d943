"""The adaptive time sampler (pretrain/diffusion/adaptive_time.py) is the same on every rank and at
every data-parallel size: its statistics are summed over the data-parallel ranks each step, so dp=2
learns the density dp=1 learns and draws the same t (the losses agree step by step to rounding).
Real `python -m pretrain.launch` jobs (gloo), as in test_layouts.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.callbacks import read_metrics
from pretrain.checkpoint import latest_checkpoint, load_trainer_state

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
COMMON = [
    "data.task.num_train=128", "data.task.num_val=32", "train.batch_size=8", "train.eval_batches=1",
    "model.n_layers=1", "model.d_model=32", "model.n_heads=4", f"train.steps={STEPS}", f"train.eval_every={STEPS}",
    "train.log_every=1", "tracking.enabled=false", "train.device=cpu", "train.dtype=fp32", "tracking.log_samples=0",
    "train.optimizer=sgd", "train.grad_clip=0", "train.lr=0.1",
    "diffusion.time_sampler=adaptive", "diffusion.adaptive.warmup_steps=2", "diffusion.adaptive.update_every=1",
    "diffusion.adaptive.decay=0.5", "diffusion.adaptive.buckets=4", "diffusion.adaptive.statistic=std",
]
REL = 1e-5  # test_layouts.py's tolerance: ranks sum in another order (measured there: <= 3e-7)


def run(tmp: Path, shards: Path, nproc: int) -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.launch", "--config", str(REPO / "configs" / "quickstart.yaml"), "--set",
         *COMMON, f"data.shard_dir={shards}", f"launch.nproc={nproc}"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (tmp / "runs" / "quickstart").iterdir()
    return run_dir


@pytest.mark.slow
def test_dp2_learns_the_density_of_dp1_and_draws_the_same_t(tmp_path):
    shards = tmp_path / "shards"
    for name in ("dp1", "dp2"):
        (tmp_path / name).mkdir()
    one, two = run(tmp_path / "dp1", shards, 1), run(tmp_path / "dp2", shards, 2)
    s1 = load_trainer_state(latest_checkpoint(one))["time_sampler"]
    s2 = load_trainer_state(latest_checkpoint(two))["time_sampler"]
    assert s1["updates"] == s2["updates"] == STEPS
    assert float(s1["mass"].max() / s1["mass"].min()) > 1.1  # it moved away from uniform
    for key in ("mass", "ema"):
        assert torch.allclose(s2[key], s1[key], rtol=REL, atol=0), (key, s1[key], s2[key])
    m1, m2 = read_metrics(one), read_metrics(two)
    for step in range(1, STEPS + 1):  # the same t and masks: the same loss (a different q would move it)
        assert m2[step]["train/loss"] == pytest.approx(m1[step]["train/loss"], rel=REL), step
        assert m2[step]["train/t_mass0.00-0.25"] == pytest.approx(m1[step]["train/t_mass0.00-0.25"], rel=REL)
