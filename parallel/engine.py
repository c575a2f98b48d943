"""The engines the trainer talks to: plain PyTorch, DeepSpeed ZeRO (stages 0-3), and DeepSpeed's
pipeline engine (parallel/pipeline.py); `parallel.build.build_engine` picks one for the layout.

One interface, so the training loop has one path whatever the layout:

    out = engine.train_step(micro_batches, loss_fn)   # one optimizer step (or a skip) -> StepOutput
    metrics = engine.eval_step(evaluate)              # evaluate(model) in eval mode, every stage's answer
    engine.save(dir) / engine.load(dir)               # every rank calls; DeepSpeed writes its shards
    engine.module                                      # the (wrapped) model, e.g. for EMA or sampling

`loss_fn(model, micro_batch, i) -> (loss, totals)` is the trainer's: it calls the model once. The
engine runs it under autocast (bf16 compute over fp32 weights in every layout, or fp32), sums the
totals over data-parallel ranks, scales each micro-batch's loss so the gradient is that of the
global per-token loss, accumulates, clips and steps. `StepOutput` carries whether the step was
applied, the global gradient norm before clipping (all data-parallel ranks' gradients averaged,
every tensor-parallel shard counted once) and the summed totals.

A non-finite loss or gradient in any micro-batch on any rank skips the whole optimizer step on every
rank and clears the gradients: a non-finite loss becomes a non-finite gradient (`backward(loss *
nan)`), and a non-finite global gradient norm skips the step (DeepSpeed's ZeRO 1-3 optimizers by
their overflow path, the plain engine and ZeRO-0's torch optimizer here; the norm is all-reduced, so
every rank takes the same decision).

Why DeepSpeed for ZeRO (and not megatron-core's distributed optimizer): megatron's optimizer and
gradient clipping assume CUDA, DeepSpeed's ZeRO 1-3 run on CPU over gloo (verified), and the same
engine saves and restores sharded optimizer state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
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


LossFn = Callable[[Any, dict, int], tuple[torch.Tensor, torch.Tensor]]
"""`loss_fn(model, micro_batch, i) -> (loss, totals)`: the loss of micro-batch `i` (a scalar, mean over
its tokens) and its float64 `totals` vector [loss x tokens, tokens, *anything the caller sums]. The
engine sums `totals` over the data-parallel ranks (one all-reduce per micro-batch) and over the
micro-batches, and hands the sums back; entries 0 and 1 weight the gradient (below)."""


@dataclass
class StepOutput:
    applied: bool  # False: a non-finite loss or gradient somewhere skipped the step on every rank
    grad_norm: float  # global L2 gradient norm before clipping (inf when skipped)
    totals: torch.Tensor  # float64: the loss function's totals summed over micro-batches and dp ranks


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 compute over fp32 weights (autocast) in every layout, or nothing in fp32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_eval(engine, evaluate: Callable[[Any], dict[str, float]]) -> dict[str, float]:
    """`evaluate(engine)` with the engine in eval mode and under its autocast; its mode restored after."""
    was_training = engine.training
    engine.eval()
    try:
        with engine.autocast():
            return evaluate(engine)
    finally:
        engine.train(was_training)


class _Modes:
    """train()/eval()/training of the module that runs the forward (`_runner`: the model itself, or
    DeepSpeed's engine around it)."""

    _runner = "module"

    def train(self, mode: bool = True) -> None:
        getattr(self, self._runner).train(mode)

    def eval(self) -> None:
        getattr(self, self._runner).eval()

    @property
    def training(self) -> bool:
        return getattr(self, self._runner).training


class _MicroBatchEngine:
    """`train_step` for the engines that run one micro-batch at a time in this process (plain,
    DeepSpeed): forward + loss under autocast, backward, and the subclass's `backward`/`step`.

    Each micro-batch's loss is rescaled so the gradient is that of the global per-token loss:
    tokens are counted over the data-parallel group (ranks can hold different numbers of real
    tokens), and the engines' averaging over ranks and micro-batches is undone. The same
    all-reduce makes every rank see a non-finite loss on any rank. Every micro-batch still runs
    its backward (gradient collectives and micro-step counters stay in step on all ranks); after a
    non-finite loss it backpropagates `loss x NaN`, so the gradient is not finite and the one rule
    (a non-finite global gradient norm skips the optimizer step and clears the gradients) skips the
    step everywhere."""

    dp_size = 1
    device = torch.device("cpu")
    dtype = "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        return _autocast(self.device, self.dtype)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFn) -> StepOutput:
        summed, finite, result = None, True, None
        for i, batch in enumerate(micro_batches):
            with self.autocast():
                loss, local = loss_fn(self, batch, i)
            glob = comm.dp_sum(local)
            finite = finite and math.isfinite(float(glob[0]))
            scale = float(local[1]) / max(float(glob[1]), 1.0) * self.dp_size
            self.backward(loss * scale if finite else loss * math.nan)
            result = self.step()
            summed = glob if summed is None else summed + glob
        if result is None:
            raise RuntimeError(f"{len(micro_batches)} micro-batches did not reach the engine's accumulation boundary")
        return StepOutput(result.applied, result.grad_norm if result.applied else math.inf, summed)

    def eval_step(self, evaluate: Callable[[Any], dict[str, float]]) -> dict[str, float]:
        """`evaluate(model)` (e.g. validation NLL over the validation stream) in eval mode under autocast."""
        return run_eval(self, evaluate)


class PlainEngine(_MicroBatchEngine, _Modes):
    """Single-process PyTorch: clip, optimizer step, zero grads."""

    kind = "plain"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, accumulation: int,
                 device: torch.device | str = "cpu", dtype: str = "fp32"):
        self.module = model
        self.optimizer = self.torch_optimizer = optimizer
        self.grad_clip = grad_clip
        self.accumulation = accumulation
        self.device, self.dtype = torch.device(device), dtype
        self._micro = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

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
        # bf16 is autocast over fp32 weights, as in the single process (the engines' autocast()):
        # DeepSpeed's own bf16 mode would cast the parameters to bf16 and train a different model
        "bf16": {"enabled": False},
        # our optimizer is torch's AdamW (fused on CUDA): DeepSpeed's FusedAdam/CPUAdam compile for ~45 s
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is ours (tqdm + MLflow)
        "wall_clock_breakdown": False,
    }


def _use_cpu_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator once, at import: the CPU one for a CPU run, even on a GPU machine."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _DeepSpeedBase(_Modes):
    """What DeepSpeed's engine and its pipeline engine share: initialisation, modes, checkpoints."""

    _runner = "engine"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], mpu=None,
                 device: torch.device | str = "cpu", dtype: str = "fp32", dp_size: int = 1):
        self.device, self.dtype, self.dp_size = torch.device(device), dtype, dp_size
        _use_cpu_accelerator(self.device)
        import deepspeed

        self.torch_optimizer = optimizer
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                                 mpu=mpu)
        self.module = self.engine.module
        self._norm: float | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return _autocast(self.device, self.dtype)

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


class DeepSpeedEngine(_MicroBatchEngine, _DeepSpeedBase):
    """DeepSpeed's engine around the plain model: ZeRO partitioning, DP gradient averaging, clipping."""

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], mpu=None,
                 device: torch.device | str = "cpu", dtype: str = "fp32", dp_size: int = 1):
        _DeepSpeedBase.__init__(self, model, optimizer, config, mpu, device, dtype, dp_size)
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
