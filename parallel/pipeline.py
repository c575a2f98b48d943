"""Pipeline parallelism: the plain DiffusionTransformer cut into stages for DeepSpeed's pipeline engine.

The model is not rewritten. `pipeline_module(model, topology)` wraps the plain model's own modules
(same weights, same initialisation) as a flat list of layers,

    EmbedStage (embed) -> PipeBlock x n_layers (blocks.i) -> HeadStage (unembed: norm_f, final_adaLN, head)

and DeepSpeed's `PipelineModule` keeps the layers of this rank's stage, balancing the transformer
blocks over the stages (`partition_method="type:PipeBlock"`). Between stages travels a tuple of
tensors: the hidden states (float, gradients flow back), the time condition c when the model is
time-conditioned (float: its gradient reaches the time embedder on the first stage), and the small
integer tensors every block needs to rebuild its attention mask (key padding, Jigsaw's revealed
blocks, which optional inputs are present). Rebuilding the mask per layer costs a few boolean ops;
sending an [L, L] mask between stages would cost far more.

Why DeepSpeed's pipeline engine (not megatron-core's schedules or torch.distributed.pipelining):
megatron-core's pipeline schedules allocate CUDA tensors and fail on CPU; DeepSpeed's runs its 1F1B
schedule on CPU over gloo and on GPU over NCCL, with ZeRO-1 and data parallelism, per-layer
checkpoint files (so `pretrain.convert` can consolidate them) and the same engine interface the
rest of the trainer already uses. DeepSpeed does not combine its pipeline engine with ZeRO-2/3;
the config validator says so.

How the diffusion objective runs through a pipeline (the objectives are not split): the trainer's
loss function corrupts the batch and calls the model once (parallel/engine.py, `LossFn`). Every rank
runs it up to that call with `capture_forward`, which records the model's inputs (the first stage
feeds them to the pipeline); the last stage runs the same loss function again inside the pipeline's
loss with a model that returns the pipeline's logits. Both calls draw from generators rebuilt from
(seed, step, dp rank, micro-batch), so they draw the same times and masks; the loss is bit-for-bit
the one the unpipelined trainer computes.

The stages call the model's own parts through the model they are cut from (its `embed_fn`,
`context_fn`, `unembed_fn`: plain functions of pretrain/model/transformer.py, so parallel/ imports
nothing from pretrain/): the [x_t | x_0] concatenation, the masks, the rotary tables and the
final adaLN exist once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel import comm
from parallel.engine import (
    LossFn,
    StepOutput,
    _DeepSpeedBase,
    _use_cpu_accelerator,
    global_grad_norm,
    run_eval,
)
from parallel.topology import Topology

log = logging.getLogger(__name__)

# positions of the optional inputs in the `present` flags tensor
_HAS_T, _HAS_X0, _HAS_REVEALED = 0, 1, 2


class EmbedStage(nn.Module):
    """Layer 0: the model's embed part (token embedding of x_t or [x_t | x_0], the time condition c)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.tok_emb, self.drop, self.time_emb = model.tok_emb, model.drop, model.time_emb
        self.embed_fn = model.embed_fn

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ids, pad, t, x0, revealed, present = inputs
        x, c = self.embed_fn(self.tok_emb, self.drop, self.time_emb, ids, t if present[_HAS_T] else None,
                            x0 if present[_HAS_X0] else None)
        return (x, pad, revealed, present) if c is None else (x, c, pad, revealed, present)


def _context(cfg, context_fn: Callable, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
             inputs: tuple[torch.Tensor, ...]):
    """(hidden states, the model's LayerContext) from a stage's input tuple: what the model's
    `context` builds once per pass, rebuilt per stage from the key padding, prompt and revealed
    blocks that travel with the hidden states."""
    x, *rest = inputs
    c = rest[0] if len(rest) == 4 else None
    pad, revealed, present = rest[-3:]
    L = pad.shape[1]
    # stage_inputs codes padding 0, real 1, real prompt token 2
    ctx = context_fn(cfg, rope_cos, rope_sin, L, x.device, pad > 0, pad == 2,
                        revealed.bool() if present[_HAS_REVEALED] else None, two_stream=x.shape[1] != L, c=c)
    return x, ctx


class PipeBlock(nn.Module):
    """One transformer block of the model, with the layer context rebuilt from the stage's inputs."""

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.block = model.blocks[index]
        self.cfg, self.context_fn = model.cfg, model.context_fn
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, ctx = _context(self.cfg, self.context_fn, self.rope_cos, self.rope_sin, inputs)
        return (self.block(x, ctx.c, ctx.cos, ctx.sin, ctx.mask, ctx.is_causal), *inputs[1:])


class HeadStage(nn.Module):
    """The last layer: the model's unembed part (final norm, adaLN, head on the x_t half)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.norm_f, self.final_adaLN, self.head = model.norm_f, model.final_adaLN, model.head
        self.unembed_fn, self.layer_context_type = model.unembed_fn, model.LayerContext

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, *rest = inputs
        c = rest[0] if len(rest) == 4 else None
        # only c and the number of positions the head reads matter here (no mask, no rotary tables)
        ctx = self.layer_context_type(c=c, cos=x.new_empty(0), sin=x.new_empty(0), mask=None, is_causal=False,
                           n_out=rest[-3].shape[1])
        return self.unembed_fn(self.norm_f, self.final_adaLN, self.head, x, ctx)


def stage_layers(model: nn.Module) -> list[nn.Module]:
    """The plain model as a flat list of pipeline layers (module docstring)."""
    if model.cfg.tie_embeddings:
        raise ValueError("model.tie_embeddings with parallel.pp > 1: the embedding and the head sit on different "
                         "stages; set model.tie_embeddings=false")
    return [EmbedStage(model), *(PipeBlock(model, i) for i in range(len(model.blocks))), HeadStage(model)]


def plain_key(layer: int, key: str, n_layers: int) -> str:
    """The plain model's state-dict key of parameter `key` of pipeline layer `layer`."""
    if 1 <= layer <= n_layers:
        return f"blocks.{layer - 1}.{key.removeprefix('block.')}"
    return key  # EmbedStage and HeadStage use the plain model's attribute names


def pipeline_module(model: nn.Module, topology: Topology, loss_fn: Callable | None = None,
                    device: torch.device | str = "cpu"):
    """DeepSpeed's PipelineModule over the plain model's layers for this rank's pipeline stage.

    The process grid is DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model; model
    varies fastest), the same rank order as megatron-core's parallel_state, so both agree on who
    is whose data-parallel peer (`check_grid` verifies it)."""
    _use_cpu_accelerator(torch.device(device))
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing process group
    grid = PipeModelDataParallelTopology(num_pp=topology.pp_size, num_mp=topology.tp_size, num_dp=topology.dp_size)
    n_blocks = len(model.blocks)
    if n_blocks < topology.pp_size:
        raise ValueError(f"parallel.pp = {topology.pp_size} stages but model.n_layers = {n_blocks}: "
                         "every stage needs at least one transformer block")
    pipe = PipelineModule(
        layers=stage_layers(model), topology=grid, loss_fn=loss_fn, partition_method="type:PipeBlock",
        # shapes differ between training (complementary masking doubles the rows, the two-stream
        # pass doubles the positions) and evaluation, and the last batch can be short
        dynamic_shape=True,
    )
    # DeepSpeed's gradient norm (for clipping) sums squares over its "model-parallel" group, which
    # here is pipeline x tensor, but counts a parameter only on model-parallel rank 0 unless it is
    # marked model-parallel: Megatron's convention for parameters replicated across tensor ranks.
    # Every stage holds different parameters, so each counts its own: all of them, except that a
    # tensor-replicated one (norms) counts on tensor rank 0 only.
    for param in pipe.parameters():
        if topology.tp_rank == 0 or getattr(param, "tensor_model_parallel", False):
            param.model_parallel = True
    # DeepSpeed keeps the whole layer list for partitioning; keep only the classes of other stages'
    # layers so their weights are freed (every rank builds the full model once, with the same seed
    # as a single process, then holds its own stage: the peak at start-up is the whole model)
    for i, layer in enumerate(pipe._layer_specs):
        if not pipe._local_start <= i < pipe._local_stop:
            pipe._layer_specs[i] = type(layer)
    pipe.n_blocks = n_blocks
    # the blockwise objectives ask the model for its block length; a plain function, not the model's
    # bound method, which would keep every stage's layers alive on every rank
    block_size, block_len_fn = model.cfg.block_size, model.block_len_fn
    pipe.block_len = lambda seq_len: block_len_fn(seq_len, block_size)
    return pipe


def check_grid(pipe) -> None:
    """Raise when DeepSpeed's data-parallel group differs from megatron-core's (they must agree)."""
    from megatron.core import parallel_state as ps

    ds = list(pipe._grid.get_data_parallel_group_ranks())
    mc = dist.get_process_group_ranks(ps.get_data_parallel_group())
    if sorted(ds) != sorted(mc):
        raise RuntimeError(f"DeepSpeed's pipeline grid puts rank {dist.get_rank()} in data-parallel group {ds}, "
                           f"megatron-core in {mc}")


class _Captured(Exception):  # noqa: N818  (control flow, not an error)
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


class StandIn:
    """What an objective calls in place of the model: `call(*args, **kwargs)`, and the model's
    `block_len` (the blockwise objectives ask the model for its block length)."""

    def __init__(self, like: nn.Module, call: Callable):
        self.block_len, self.call = getattr(like, "block_len", None), call

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def capture_forward(like: nn.Module, loss_fn: Callable, *args, **kwargs) -> tuple[tuple, dict]:
    """Run `loss_fn(model, *args, **kwargs)` up to its (single) model call and return that call's
    (args, kwargs). Nothing after the call runs; everything before it (corruption, RNG draws) does.
    `like`: the model (or pipeline module) whose `block_len` the stand-in answers with."""

    def model(*a, **k):
        raise _Captured(a, k)

    try:
        loss_fn(StandIn(like, model), *args, **kwargs)
    except _Captured as c:
        return c.args, c.kwargs
    raise RuntimeError(f"{loss_fn} never called the model")


def replay(like: nn.Module, loss_fn: Callable, logits: torch.Tensor, *args, **kwargs):
    """`loss_fn(model, *args, **kwargs)` with a model that returns `logits` (the pipeline's output)."""
    return loss_fn(StandIn(like, lambda *a, **k: logits), *args, **kwargs)


def stage_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """The first stage's input tuple for a model call `model(input_ids, t, key_padding_mask=, x0=,
    revealed_blocks=, prompt_mask=)`: every slot filled (absent ones by placeholders) and flagged in `present`."""
    names = ("input_ids", "t", "key_padding_mask", "x0", "revealed_blocks")
    call = dict(zip(names, args, strict=False)) | kwargs
    ids = call["input_ids"]
    B, L = ids.shape
    t, pad = call.get("t"), call.get("key_padding_mask")
    pad = (pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)).long()
    if call.get("prompt_mask") is not None:  # travels inside the padding tensor: 2 = a real prompt token
        pad = pad + (call["prompt_mask"].bool() & (pad > 0)).long()
    x0, revealed = call.get("x0"), call.get("revealed_blocks")
    present = torch.tensor([t is not None, x0 is not None, revealed is not None], dtype=torch.long)
    return (
        ids,
        pad,
        t.float() if t is not None else torch.zeros(B),
        x0 if x0 is not None else torch.zeros(B, 1, dtype=torch.long),
        revealed.long() if revealed is not None else torch.zeros(B, 1, dtype=torch.long),
        present,
    )


class PipelineEngine(_DeepSpeedBase):
    """DeepSpeed's pipeline engine behind the trainer's engine interface.

    - `train_step(micro_batches, loss_fn)`: one optimizer step over the micro-batches (1F1B schedule,
      gradient accumulation, data-parallel gradient averaging, clipping). Every rank runs `loss_fn` up
      to its model call (`capture_forward`: the first stage feeds those inputs in); the last stage
      runs it again on the pipeline's logits (`replay`) with the same arguments, so with the same
      step RNG it computes the same loss, scaled as the other engines scale it. The totals go from
      the last stage to the whole pipeline.
    - `eval_step(evaluate)`: `evaluate(self)`, where calling the engine is a forward pass through the
      pipeline: the logits on the last stage, a placeholder of the same shape elsewhere; the
      resulting metrics are the last stage's, on every stage.
    - A step whose loss was non-finite on any rank is skipped as a whole on every stage (the loss
      function's flag is all-reduced before the optimizer step), and so is one whose gradient norm
      is not finite.
    """

    kind = "pipeline"

    def __init__(self, pipe, optimizer: torch.optim.Optimizer, config: dict[str, Any], vocab_size: int,
                 device: torch.device | str = "cpu", dtype: str = "fp32", dp_size: int = 1):
        super().__init__(pipe, optimizer, config, None, device, dtype, dp_size)
        self.vocab_size = vocab_size
        self._skip = False
        take_step = self.engine._take_model_step
        # ZeRO-1 and the bf16 optimizer measure the norm and skip a non-finite one themselves
        own_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")

        def guarded_step(lr_kwargs=None):
            self.engine._step_applied = False  # the pipeline schedule calls this without engine.step()
            # every stage steps or skips together
            skip = comm.all_reduce_max(1.0 if self._skip else 0.0)
            self._norm = self._grad_norm() if own_norm else None
            if skip or (self._norm is not None and not math.isfinite(self._norm)):
                self.engine.zero_grad()
                return
            take_step(lr_kwargs)

        self.engine._take_model_step = guarded_step

    def _grad_norm(self) -> float:
        """The global gradient norm (before clipping), counted as DeepSpeed's clipping counts it."""
        return global_grad_norm(self.engine.module.parameters(), lambda p: getattr(p, "model_parallel", False),
                                self.engine.grid.get_model_parallel_group())

    def _step_grad_norm(self) -> float:
        """The last train_batch's global gradient norm before clipping (inf when it was skipped)."""
        if not self.engine.was_step_applied():
            return math.inf
        norm = self._norm if self._norm is not None else self.engine.get_global_grad_norm()
        return float(norm)

    @property
    def is_last_stage(self) -> bool:
        return self.engine.is_last_stage()

    @property
    def last_stage_rank(self) -> int:
        """Global rank of the last stage of this rank's pipeline."""
        return self.engine.grid.stage_to_global(self.engine.num_stages - 1)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        inputs = stage_inputs(args, kwargs)
        # eval_batch adds the outputs into the running training loss (train_batch resets it, eval
        # does not): with compute_loss=False the outputs are logits, which do not add to a scalar
        self.engine.total_loss = None
        _, logits = self.engine.eval_batch(
            iter([(inputs, torch.zeros(1))]), return_logits=True, compute_loss=False, reduce_output=None,
            bcast_loss=False, num_micro_batches=1,
        )
        if logits is not None:
            return logits
        B, L = inputs[0].shape
        # not the last stage: what the caller computes from this is discarded
        return torch.zeros(1, 1, self.vocab_size, device=inputs[0].device).expand(B, L, self.vocab_size)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFn) -> StepOutput:
        pipe = self.engine.module
        inputs = [stage_inputs(*capture_forward(pipe, loss_fn, b, i)) for i, b in enumerate(micro_batches)]
        results: list[torch.Tensor] = []

        def pipe_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            i = int(label[0])
            loss, local = replay(pipe, loss_fn, logits, micro_batches[i], i)
            glob = comm.dp_sum(local)
            results.append(glob)
            if not math.isfinite(float(glob[0])):
                self._skip = True
                return loss * 0.0
            return loss * (float(local[1]) / max(float(glob[1]), 1.0) * self.dp_size)

        self._skip = False
        self.engine.module.loss_fn = pipe_loss
        with self.autocast():
            self.engine.train_batch(iter([(x, torch.tensor([i])) for i, x in enumerate(inputs)]))
        # the last stage holds the totals; the others learn their length, then the totals themselves
        n = comm.from_last_stage(torch.tensor([float(len(results[0]) if results else 0)]), self.last_stage_rank)
        summed = torch.stack(results).sum(dim=0) if results else torch.zeros(int(n[0]), dtype=torch.float64)
        summed = comm.from_last_stage(summed, self.last_stage_rank)
        applied = self.engine.was_step_applied()
        return StepOutput(applied, self._step_grad_norm(), summed)

    def eval_step(self, evaluate: Callable[[Any], dict[str, float]]) -> dict[str, float]:
        metrics = run_eval(self, evaluate)
        keys = sorted(metrics)  # only the last stage saw real logits: its numbers for every stage
        values = comm.from_last_stage(torch.tensor([metrics[k] for k in keys], dtype=torch.float64),
                                      self.last_stage_rank)
        return dict(zip(keys, values.tolist(), strict=True))

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's layers under the plain model's keys (other stages hold the rest)."""
        n_layers = self.engine.module.n_blocks
        return {plain_key(int(k.split(".", 1)[0]), k.split(".", 1)[1], n_layers): v
                for k, v in self.engine.module.state_dict().items()}


def consolidate_layer_files(ds_dir, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The plain model's state dict (tensor-parallel rank `tp_rank`'s shard) from DeepSpeed's
    per-layer pipeline checkpoint files `layer_XX-model_RR-model_states.pt`."""
    import re
    from pathlib import Path

    pattern = re.compile(rf"layer_(\d+)-model_{tp_rank:02d}-model_states\.pt")
    files = {int(m.group(1)): f for f in Path(ds_dir).iterdir() if (m := pattern.fullmatch(f.name))}
    if not files:
        raise FileNotFoundError(f"{ds_dir} holds no pipeline layer files for tensor-parallel rank {tp_rank}")
    n_layers = len(files) - 2  # embedding and head around the blocks
    missing = sorted(set(range(n_layers + 2)) - set(files))
    if missing:
        raise FileNotFoundError(f"{ds_dir}: pipeline layer files missing for layers {missing}")
    out: dict[str, torch.Tensor] = {}
    for layer, f in sorted(files.items()):
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            out[plain_key(layer, k, n_layers)] = v
    return out
