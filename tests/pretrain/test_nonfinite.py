"""Non-finite losses and gradients (issue 18.5): a NaN in any micro-batch on any rank skips the whole
optimizer step on every rank, is counted and logged, and `train.max_nonfinite_steps` skipped steps
in a row stop the run with its last good checkpoint.

NaN is injected into the real trainer by wrapping its objective (a loss times NaN) or by a gradient
hook on one parameter (a finite loss with a NaN gradient). In one process: the plain engine with
gradient accumulation (NaN in the first, then the last micro-batch; a NaN gradient; the stop). In
two processes (this file is also the worker, `python test_nonfinite.py OUTDIR`): DeepSpeed ZeRO-0
and ZeRO-2 at dp=2 with accumulation, NaN on rank 1 only.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the worker: import this checkout
    sys.path.insert(0, str(REPO))

from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain.callbacks import Callback, CheckpointCallback, MetricsFileCallback  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.train import NonFiniteLossError, Trainer  # noqa: E402

QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY = [
    "data.task.num_train=64", "data.task.num_val=16", "train.batch_size=4", "train.micro_batch_size=2",
    "train.eval_batches=1", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.steps=4",
    "train.eval_every=100", "train.log_every=1", "train.warmup_steps=0", "tracking.enabled=false",
    "train.device=cpu", "train.dtype=fp32", "tracking.log_samples=0",
]


class Snapshots(Callback):
    """The weights after every completed step (key: step) and every skipped one (key: ('skip', n))."""

    def __init__(self) -> None:
        self.after: dict = {}

    def _weights(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}

    def on_train_start(self, trainer: Trainer) -> None:
        self.after[0] = self._weights(trainer)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.after[trainer.state.step] = self._weights(trainer)

    def on_step_skipped(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.after[("skip", int(metrics["train/skipped_steps"]))] = self._weights(trainer)


def inject_nan_loss(trainer: Trainer, when: set[tuple[int, int]], rank: int | None = None) -> list:
    """Make the loss NaN at (optimizer step, micro-batch) in `when`, once each (on `rank` only)."""
    inner, hits = trainer.objective.training_loss, []

    def training_loss(model, batch, rng):
        loss, stats = inner(model, batch, rng)
        key = (trainer.state.step, rng.micro)
        if key in when and (rank is None or trainer.topology.rank == rank):
            when.discard(key)
            hits.append(key)
            loss = loss * math.nan
        return loss, stats

    trainer.objective.training_loss = training_loss
    return hits


def build(tmp: Path, shards: Path, extra: list[str], topology=None) -> tuple[Trainer, Snapshots]:
    from parallel.topology import Topology

    cfg = load_config(QUICKSTART, [*TINY, f"data.shard_dir={shards}", *extra])
    tmp.mkdir(parents=True, exist_ok=True)
    snaps = Snapshots()
    callbacks = [CheckpointCallback(), snaps]
    if topology is None or topology.is_rank0:
        callbacks.append(MetricsFileCallback(tmp / "metrics.jsonl"))
    return Trainer(cfg, tmp, topology or Topology(), callbacks), snaps


def skips(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "skip"]


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shards") / "sudoku"


@pytest.mark.parametrize("micro", [0, 1], ids=["first-micro-batch", "last-micro-batch"])
def test_nan_loss_in_one_micro_batch_skips_the_whole_step(tmp_path, shards, micro):
    trainer, snaps = build(tmp_path, shards, [])
    hits = inject_nan_loss(trainer, {(2, micro)})
    summary = trainer.fit()
    assert hits == [(2, micro)]
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    # the skipped attempt left the weights of step 2 exactly; the step after it trained
    assert_same(snaps.after[("skip", 1)], snaps.after[2])
    assert not torch.equal(snaps.after[3]["head.weight"], snaps.after[2]["head.weight"])
    (skip,) = skips(tmp_path)
    assert skip["step"] == 2 and skip["train/skipped_steps"] == 1.0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"])
               for m in metrics if m["kind"] == "train")


def test_nan_gradient_with_a_finite_loss_skips_the_step(tmp_path, shards):
    trainer, snaps = build(tmp_path, shards, [])
    calls = {"n": 0}

    def poison(grad):  # the 5th and 6th backward: both micro-batches of step 2
        calls["n"] += 1
        return grad * math.nan if calls["n"] == 5 else grad

    trainer.engine.module.head.weight.register_hook(poison)
    summary = trainer.fit()
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    assert_same(snaps.after[("skip", 1)], snaps.after[2])


def test_max_nonfinite_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path, shards):
    trainer, snaps = build(tmp_path, shards, ["train.max_nonfinite_steps=2", "train.checkpoint_every=2",
                                              "train.steps=6"])
    # step index 2 fails twice in a row (the skipped attempt retries step index 2)
    inject_nan_loss(trainer, {(2, 0)})
    inner = trainer.objective.training_loss

    def always_nan_after_first(model, batch, rng):
        loss, stats = inner(model, batch, rng)
        if trainer.state.step == 2 and trainer.state.skipped_steps >= 1:
            loss = loss * math.nan
        return loss, stats

    trainer.objective.training_loss = always_nan_after_first
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row at step 2 .*step_0000002"):
        trainer.fit()
    assert trainer.state.step == 2 and trainer.state.skipped_steps == 2
    assert [s["train/nonfinite_in_a_row"] for s in skips(tmp_path)] == [1.0, 2.0]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_0000002"
    assert_same(torch.load(latest / "model.pt", weights_only=True), snaps.after[2])
    assert_same(snaps.after[("skip", 2)], snaps.after[2])


# ---------------------------------------------------------------------------------------------
# Two ranks: DeepSpeed at dp=2, NaN on rank 1 only
# ---------------------------------------------------------------------------------------------

SCENARIOS = {  # name: (config overrides, (step, micro) where rank 1's loss is NaN)
    "zero0-first-micro": (["parallel.zero_stage=0"], (1, 0)),
    "zero2-last-micro": (["parallel.zero_stage=2"], (2, 1)),
}


def worker(outdir: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from parallel.state import destroy, init_distributed

    topo = init_distributed("gloo", tp=1, pp=1, timeout_s=120)
    out = {}
    for name, (extra, when) in SCENARIOS.items():
        run_dir = outdir / name
        trainer, snaps = build(run_dir, outdir / "shards", ["launch.nproc=2", "train.batch_size=8", *extra],
                               topology=topo)
        hits = inject_nan_loss(trainer, {when}, rank=1)
        summary = trainer.fit()
        step = when[0]
        out[name] = {
            "hits": hits,
            "steps": summary["steps"],
            "skipped": summary["skipped_steps"],
            "unchanged": all(torch.equal(snaps.after[("skip", 1)][k], snaps.after[step][k])
                             for k in snaps.after[step]),
            "moved_after": not torch.equal(snaps.after[step + 1]["head.weight"], snaps.after[step]["head.weight"]),
            "head_sum": float(snaps.after[4]["head.weight"].double().sum()),
        }
    destroy()
    (outdir / f"rank{topo.rank}.json").write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    from data_pipeline.build import ensure_shards

    ensure_shards(load_config(QUICKSTART, [*TINY, f"data.shard_dir={tmp_path / 'shards'}"]).data)  # as the launcher
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank][-4000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for name, (_, when) in SCENARIOS.items():
        assert r0[name]["hits"] == [] and r1[name]["hits"] == [list(when)], name  # rank 1 only
        for r in (r0, r1):
            assert r[name]["steps"] == 4 and r[name]["skipped"] == 1, name
            assert r[name]["unchanged"] and r[name]["moved_after"], name
        assert r0[name]["head_sum"] == r1[name]["head_sum"], name  # the replicas stayed identical
        (skip,) = skips(tmp_path / name)
        assert skip["step"] == when[0]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
