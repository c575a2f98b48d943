"""Layout equivalence: the same seed and data give the same training loss and gradient norm, step by
step, and the same validation NLL of the same weights, whatever the parallel layout. This is the
test that proves the parallel code right; do not loosen it to pass.

Each layout is a real `python -m pretrain.launch` job: the local launcher starts the ranks, which
form gloo process groups, megatron-core's tensor/data groups and a DeepSpeed engine (ZeRO 0-3, or
its pipeline engine). The pipeline's own variants (two-stream passes, time conditioning) have
their pp=1 vs pp=2 comparison in test_pipeline.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.callbacks import read_metrics

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STEPS = 20
COMMON = [
    "data.task.num_train=256", "data.task.num_val=32", "train.batch_size=8", "train.eval_batches=1",
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", f"train.steps={STEPS}", f"train.eval_every={STEPS}",
    "train.log_every=1", "train.warmup_steps=5", "tracking.enabled=false", "train.device=cpu", "train.dtype=fp32",
    "train.peak_tflops=1",  # a stated peak so MFU is logged on CPU (per device: checked below)
]
# Two optimizer settings, each with its own single-process reference. AdamW with clipping is what
# recipes use, but it hides a constant factor on the gradient (Adam divides it out, clipping caps
# it); plain SGD without clipping steps by lr x gradient, so a wrong averaging factor over ranks or
# micro-batches changes every later loss. Every layout is compared on loss and gradient norm.
OPTIMIZERS = {
    "adamw": [],
    "sgd": ["train.optimizer=sgd", "train.grad_clip=0", "train.lr=0.1"],
}
LAYOUTS = {  # name: (optimizer, overrides)
    "dp2-zero0": ("sgd", ["launch.nproc=2", "parallel.zero_stage=0"]),
    "dp2-zero1": ("adamw", ["launch.nproc=2", "parallel.zero_stage=1"]),
    "dp2-zero2": ("adamw", ["launch.nproc=2", "parallel.zero_stage=2"]),
    "dp2-zero3": ("sgd", ["launch.nproc=2", "parallel.zero_stage=3"]),
    "tp2": ("sgd", ["launch.nproc=2", "parallel.tp=2"]),
    "tp2-dp2-zero1": ("adamw", ["launch.nproc=4", "parallel.tp=2", "parallel.zero_stage=1"]),
    "dp1-accum2": ("sgd", ["launch.nproc=1", "train.micro_batch_size=4"]),
    # ZeRO on one process: DeepSpeed's engine without a launcher's environment (LOCAL_RANK unset)
    "dp1-zero1": ("adamw", ["launch.nproc=1", "parallel.zero_stage=1"]),
    "dp2-zero2-accum2": ("sgd", ["launch.nproc=2", "parallel.zero_stage=2", "train.micro_batch_size=2"]),
    "pp2": ("adamw", ["launch.nproc=2", "parallel.pp=2"]),
    "pp2-accum2": ("sgd", ["launch.nproc=2", "parallel.pp=2", "train.micro_batch_size=4"]),
    "pp2-dp2-zero1": ("adamw", ["launch.nproc=4", "parallel.pp=2", "parallel.zero_stage=1"]),
    "tp2-pp2": ("adamw", ["launch.nproc=4", "parallel.tp=2", "parallel.pp=2"]),
}
# Against the single process, a layout differs by rounding only: ranks average gradients in another
# order, tensor parallelism splits matmuls, ZeRO flattens buffers, DeepSpeed clips with a float32 norm
# (the plain engine: float64). Measured over 20 steps (2 cores, one thread per rank): at most 3e-7
# relative on loss and grad norm (dp2-zero0 2.7e-7, dp2-zero2-accum2 2.4e-7, pp2 1.1e-7); REL leaves
# 30x for other BLAS builds. A scale error of even 1% shows at step 2 (SGD) or in the norm at step 1.
REL = 1e-5
# Layouts that run exactly the arithmetic of another: the pipeline computes each micro-batch on the
# same process-local tensors in the same order as the plain model and, without clipping (SGD),
# steps identically, so its losses must be bit-for-bit those of the single process with the same
# micro-batches (the gradient norm up to the order of its float64 sum).
EXACT = {"pp2-accum2": "dp1-accum2"}


def run_layout(tmp: Path, shards: Path, extra: list[str], steps: int = STEPS) -> dict[int, dict[str, float]]:
    # one BLAS thread per rank: a thread count that differs between runs changes summation order
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.launch", "--config", str(QUICKSTART), "--set", *COMMON,
         f"data.shard_dir={shards}", *extra],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (tmp / "runs" / "quickstart").iterdir()
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, steps + 1))
    metrics[0] = read_metrics(run_dir, "eval")[0]  # validation of the initial weights (the same everywhere)
    return metrics


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shards") / "sudoku"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """name -> metrics, each run once per module on first use: the references ("dp1-adamw",
    "dp1-sgd") and the layouts (a run of a few layouts launches only what they compare against)."""
    cache: dict[str, dict[int, dict[str, float]]] = {}

    def get(name: str) -> dict[int, dict[str, float]]:
        if name not in cache:
            if name.startswith("dp1-") and name[4:] in OPTIMIZERS:
                extra = ["launch.nproc=1", *OPTIMIZERS[name[4:]]]
            else:
                optimizer, overrides = LAYOUTS[name]
                extra = [*OPTIMIZERS[optimizer], *overrides]
            cache[name] = run_layout(tmp_path_factory.mktemp(name), shards, extra)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process_loss_and_grad_norm(name, runs):
    optimizer, overrides = LAYOUTS[name]
    ref = runs(f"dp1-{optimizer}")
    got = runs(name)
    if name in EXACT:
        twin = runs(EXACT[name])
        for step in range(1, STEPS + 1):
            assert got[step]["train/loss"] == twin[step]["train/loss"], (name, EXACT[name], step)
            # the norm's float64 sum of squares adds the two stages' parts in another order: last bit
            assert got[step]["train/grad_norm"] == pytest.approx(twin[step]["train/grad_norm"], rel=1e-14, abs=0)
    world = int(next(o for o in overrides if o.startswith("launch.nproc=")).split("=")[1])
    for step in range(1, STEPS + 1):
        g, r = got[step], ref[step]
        for key in ("train/loss", "train/grad_norm"):
            assert g[key] == pytest.approx(r[key], rel=REL), (name, step, key, g[key], r[key])
        # MFU per device: the same real (non-padding) tokens per step at every layout, and the job's
        # rate of them divided by world size x one device's peak (1 TFLOP/s, train.peak_tflops)
        real = g["train/real_tokens_per_s"] * g["train/step_time_s"]
        assert real == pytest.approx(r["train/real_tokens_per_s"] * r["train/step_time_s"], rel=1e-9)
        assert real < g["train/tokens_per_s"] * g["train/step_time_s"]  # padding is not counted
        assert g["train/mfu"] * world / g["train/real_tokens_per_s"] == pytest.approx(
            r["train/mfu"] / r["train/real_tokens_per_s"], rel=1e-9)
    assert ref[STEPS]["train/loss"] < ref[1]["train/loss"]  # it trained: the comparison is not between constants
    # validation draws t and masks per global sample, not per rank: the same weights (step 0) score the
    # same at every layout (was 2.8589 at dp=1 vs 2.8990 at dp=2); left to rounding of batch shapes
    assert got[0]["val/nll"] == pytest.approx(ref[0]["val/nll"], rel=1e-6), (got[0]["val/nll"], ref[0]["val/nll"])
    assert got[0]["val/tokens"] == ref[0]["val/tokens"]  # the same sequences were evaluated
