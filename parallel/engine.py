"""The optimizer-step driver the trainer talks to: plain PyTorch, or DeepSpeed ZeRO (stages 0-3).

One small interface so the training loop does not branch on the layout:

    logits = engine(x_t, t, key_padding_mask=...)   # forward through the (wrapped) model
    engine.backward(loss)                           # loss of one micro-batch; accumulation handled
    grad_norm = engine.step()                       # after every micro-batch; steps at the boundary
    engine.save(dir) / engine.load(dir)             # every rank calls; DeepSpeed writes its shards

Gradient accumulation: both engines divide each micro-batch loss by the number of accumulation
steps, and DeepSpeed averages gradients over data-parallel ranks, so the trainer passes a loss whose
sum over micro-batches and ranks is the global per-token loss times (dp x accumulation steps).

At the accumulation boundary `step()` returns a `StepResult`: the global gradient norm before
clipping (all data-parallel ranks' gradients averaged, every tensor-parallel shard counted once)
and whether the optimizer stepped. A non-finite gradient norm skips the optimizer step on every
rank and clears the gradients: DeepSpeed's ZeRO 1-3 and bf16 optimizers do so themselves (their
overflow path), the plain engine and ZeRO-0's torch optimizer here. The norm is all-reduced, so
every rank takes the same decision. The trainer turns a non-finite loss into a non-finite gradient
(`backward(loss * nan)`) so that one rule covers both.

Why DeepSpeed for ZeRO (and not megatron-core's distributed optimizer): megatron's optimizer and
gradient clipping assume CUDA, DeepSpeed's ZeRO 1-3 run on CPU over gloo (verified), and the same
engine saves and restores sharded optimizer state.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parallel import comm

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "deepspeed"  # sub-directory of a checkpoint that holds DeepSpeed's own files


@dataclass
class StepResult:
    grad_norm: float  # global L2 norm of the gradient before clipping (inf/nan when not finite)
    applied: bool  # False: the gradient was not finite and the optimizer step was skipped


def global_grad_norm(params, counted=lambda p: True, group=None) -> float:
    """L2 norm of the gradients of `params` that `counted` selects, summed over `group` (the ranks that
    hold different parameters: tensor/pipeline peers; None = this process only). Per-tensor norms in
    one foreach kernel (as torch's clip_grad_norm_), their squares summed in float64 on the
    gradients' device; one scalar to the host."""
    grads = [p.grad.detach() for p in params if p.grad is not None and counted(p)]
    if grads:
        sq = torch.stack(torch._foreach_norm(grads)).double().square().sum()
    else:
        sq = torch.zeros((), dtype=torch.float64)
    if group is not None:
        sq = comm.all_reduce(sq, "sum", group)
    return float(sq.sqrt())


class PlainEngine:
    """Single-process PyTorch: clip, AdamW step, zero grads."""

    kind = "plain"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, accumulation: int):
        self.module = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.accumulation = accumulation
        self._micro = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.eval()

    @property
    def training(self) -> bool:
        return self.module.training

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> StepResult | None:
        """Counts micro-batches; at the accumulation boundary clips and steps (or skips a non-finite
        gradient) and returns the gradient norm."""
        self._micro += 1
        if self._micro % self.accumulation:
            return None
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params)
        applied = math.isfinite(norm)
        if applied:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, torch.tensor(norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, applied)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def save(self, directory: Path, is_rank0: bool) -> None:
        if is_rank0:
            torch.save(self.module.state_dict(), directory / "model.pt")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path, device: torch.device) -> None:
        model = torch.load(directory / "model.pt", map_location=device, weights_only=True)
        self.module.load_state_dict(model)
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))


def deepspeed_config(
    micro_batch: int, accumulation: int, dp_size: int, grad_clip: float, zero_stage: int, dtype: str,
    n_params: int = 500_000_000,
) -> dict[str, Any]:
    # DeepSpeed's bucket defaults (5e8 elements) suit billion-parameter models; ZeRO-3 allocates its
    # reduce bucket up front, ~2 GB per rank in fp32 even for a small model. Size them to the model.
    bucket = int(min(5e8, max(2**20, n_params)))
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * dp_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            **({"stage3_prefetch_bucket_size": bucket} if zero_stage == 3 else {}),
        },
        "bf16": {"enabled": dtype == "bf16"},
        # our optimizer is torch's AdamW (fused on CUDA): DeepSpeed's FusedAdam/CPUAdam compile for ~45 s
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is ours (tqdm + MLflow)
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed's engine around the plain model: ZeRO partitioning, DP gradient averaging, clipping."""

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], mpu=None):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                                 mpu=mpu)
        self.module = self.engine.module
        self._norm: float | None = None
        # ZeRO 1-3 and DeepSpeed's bf16 optimizer measure the norm (and skip a non-finite one); ZeRO-0 in
        # fp32 hands the gradient to our torch optimizer, which does neither: measure and guard it here
        if not hasattr(self.engine.optimizer, "_global_grad_norm"):
            self._guard_model_step(mpu)

    def _guard_model_step(self, mpu) -> None:
        """Wrap DeepSpeed's optimizer step (gradients are averaged over data-parallel ranks by then):
        record the global norm, counted as DeepSpeed's clipping counts it (a tensor-parallel shard on
        every rank, a replicated parameter on tensor rank 0), and skip the step when it is not finite."""
        group = mpu.get_model_parallel_group() if mpu is not None and mpu.get_model_parallel_world_size() > 1 \
            else None
        first = mpu is None or mpu.get_model_parallel_rank() == 0
        from deepspeed.runtime.utils import is_model_parallel_parameter

        def counted(p) -> bool:
            return first or is_model_parallel_parameter(p)

        take_step = self.engine._take_model_step

        def guarded_step(lr_kwargs=None):
            self._norm = global_grad_norm(self.engine.module.parameters(), counted, group)
            if math.isfinite(self._norm):
                take_step(lr_kwargs)  # sets the engine's step_applied
            else:
                self.engine.zero_grad()

        self.engine._take_model_step = guarded_step

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def eval(self) -> None:
        self.engine.eval()

    @property
    def training(self) -> bool:
        return self.engine.training

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/accumulation itself

    def step(self) -> StepResult | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return None
        applied = self.engine.was_step_applied()
        norm = self._norm if self._norm is not None else self.engine.get_global_grad_norm()
        # a skipped ZeRO-3 step leaves the previous step's norm in place: report it as not finite
        return StepResult(float(norm) if applied and norm is not None else math.inf, applied)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (unpartitioned) weights; collective under ZeRO-3, call on every rank."""
        if self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return self.engine.module.state_dict()

    def save(self, directory: Path, is_rank0: bool) -> None:
        # collective: every rank writes its own ZeRO partition
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, directory: Path, device: torch.device) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory / DEEPSPEED_TAG} holds no DeepSpeed checkpoint")
