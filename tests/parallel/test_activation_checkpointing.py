"""Activation checkpointing (issue 18 item 13): recomputing blocks in the backward pass changes what
is held in memory, not what is computed. On CPU in fp32 the recompute runs the same kernels on the
same inputs (and the non-reentrant checkpoint restores the RNG, so dropout draws the same mask): the
loss, the gradients and the trained weights are compared bit for bit (torch.equal), for the model
alone, for the real Trainer on the plain engine, and for a DeepSpeed ZeRO-1 launch at dp=2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpointed_blocks,
    is_checkpointed,
)
from pretrain.callbacks import Callback, read_metrics
from pretrain.config import ConfigError, load_config
from pretrain.model import build_model
from pretrain.train import Trainer

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY = [
    "data.task.num_train=64", "data.task.num_val=16", "train.batch_size=4", "train.micro_batch_size=2",
    "train.eval_batches=1", "model.n_layers=3", "model.d_model=32", "model.n_heads=2", "train.steps=3",
    "train.eval_every=100", "train.log_every=1", "train.warmup_steps=0", "tracking.enabled=false",
    "train.device=cpu", "train.dtype=fp32", "tracking.log_samples=0",
]


def test_which_blocks_are_checkpointed():
    assert checkpointed_blocks(5, "none") == []
    assert checkpointed_blocks(5, "all") == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "every_k", 2) == [0, 2, 4]
    assert checkpointed_blocks(5, "every_k", 1) == [0, 1, 2, 3, 4]


def test_config_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing.*none, all, every_k"):
        load_config(QUICKSTART, ["train.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing_k.*must be >= 1"):
        load_config(QUICKSTART, ["train.activation_checkpointing=every_k", "train.activation_checkpointing_k=0"])


def _loss_and_grads(mode: str, k: int = 2):
    cfg = load_config(QUICKSTART, ["model.n_layers=3", "model.d_model=32", "model.n_heads=2",
                                   "model.dropout=0.1", "model.time_conditioning=true", "data.seq_len=24"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 20, 24)
    names_before = [n for n, _ in model.named_parameters()]
    chosen = apply_activation_checkpointing(model, mode, k)
    assert [n for n, _ in model.named_parameters()] == names_before  # state dicts are unchanged
    assert [i for i, b in enumerate(model.blocks) if is_checkpointed(b)] == chosen
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (3, 24), generator=g)
    pad = torch.ones(3, 24, dtype=torch.bool)
    pad[1, 17:] = False
    t = torch.rand(3, generator=g)
    model.train()
    torch.manual_seed(2)  # dropout
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logits = model(ids, t, key_padding_mask=pad)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("mode,k", [("all", 2), ("every_k", 2)])
def test_model_loss_and_grads_are_bit_identical_and_less_is_saved(mode, k):
    ref_loss, ref_grads, ref_bytes = _loss_and_grads("none")
    loss, grads, saved_bytes = _loss_and_grads(mode, k)
    assert torch.equal(loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n
    # what autograd holds between forward and backward: a checkpointed block saves its inputs only
    assert saved_bytes < (0.5 if mode == "all" else 0.8) * ref_bytes


class Record(Callback):
    def __init__(self) -> None:
        self.metrics: list[tuple[float, float]] = []

    def on_step_end(self, trainer, metrics) -> None:
        self.metrics.append((metrics["train/loss"], metrics["train/grad_norm"]))


def _fit(tmp: Path, shards: Path, extra: list[str]):
    from parallel.topology import Topology

    cfg = load_config(QUICKSTART, [*TINY, f"data.shard_dir={shards}", *extra])
    rec = Record()
    tmp.mkdir(parents=True)
    trainer = Trainer(cfg, tmp, Topology(), [rec])
    trainer.fit()
    return rec.metrics, {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}


def test_trainer_plain_engine_same_losses_grad_norms_and_weights(tmp_path):
    shards = tmp_path / "shards"
    ref_metrics, ref_weights = _fit(tmp_path / "none", shards, ["model.dropout=0.1"])
    metrics, weights = _fit(tmp_path / "all", shards, ["model.dropout=0.1", "train.activation_checkpointing=all"])
    assert len(metrics) == 3 and metrics == ref_metrics  # loss and grad norm of every step, exactly
    for k in ref_weights:
        assert torch.equal(weights[k], ref_weights[k]), k


def _launch(tmp: Path, shards: Path, extra: list[str]) -> dict[int, dict[str, float]]:
    tmp.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.launch", "--config", str(QUICKSTART), "--set", *TINY,
         "train.micro_batch_size=1", f"data.shard_dir={shards}", "launch.nproc=2", "parallel.zero_stage=1", *extra],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (tmp / "runs" / "quickstart").iterdir()
    return read_metrics(run_dir)


@pytest.mark.slow
def test_deepspeed_zero1_dp2_same_losses_and_grad_norms(tmp_path):
    shards = tmp_path / "shards"
    ref = _launch(tmp_path / "none", shards, [])
    ck = _launch(tmp_path / "every2", shards, ["train.activation_checkpointing=every_k"])
    assert sorted(ck) == [1, 2, 3]
    for step in ck:
        for key in ("train/loss", "train/grad_norm"):
            assert ck[step][key] == ref[step][key], (step, key)
