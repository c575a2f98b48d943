"""`build_engine(model, cfg, topology, ...)`: the plain model, parallelised for this rank's layout, behind
the one engine interface (parallel/engine.py: `train_step`, `eval_step`, `save`, `load`).

torchtitan's `parallelize_fn` in one place: tensor parallelism swaps in megatron-core layers,
pipeline parallelism cuts the model into this rank's stage, and the engine is chosen by the layout:

    pp > 1                          -> PipelineEngine (DeepSpeed's pipeline engine, ZeRO 0/1)
    several ranks, or ZeRO 1-3      -> DeepSpeedEngine (ZeRO, data-parallel averaging, clipping)
    otherwise                       -> PlainEngine (plain PyTorch)

`cfg` is the trainer's Config, read for `train.*` and `parallel.zero_stage` only (this package does
not import pretrain's config).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.engine import DeepSpeedEngine, PlainEngine, deepspeed_config
from parallel.pipeline import PipelineEngine, check_grid, pipeline_module
from parallel.state import DeepSpeedMpu
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import Topology


def build_engine(model: torch.nn.Module, cfg, topology: Topology, *,
                 make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                 device: torch.device, dtype: str, micro_batch: int, accumulation: int, vocab_size: int,
                 n_params: int):
    """The engine for `model` (plain, on `device`, every rank built with the same seed) in `topology`.
    `make_optimizer` builds the optimizer over the parallelised model's parameters; the engine keeps it
    as `torch_optimizer` (the LR scheduler's)."""
    t = cfg.train
    if topology.tp_size > 1:
        model = apply_tensor_parallel(model)  # megatron-core layers, weights copied from the plain init
    if t.activation_checkpointing != "none":  # after TP (it swaps sub-modules), before the pipeline split
        apply_activation_checkpointing(model, t.activation_checkpointing, t.activation_checkpointing_k)
    if t.compile:  # in place: parameter names and checkpoints stay those of the plain model (tp = pp = 1)
        model.compile()
    if topology.pp_size > 1:  # DeepSpeed's pipeline engine over this rank's stage of the plain model
        model = pipeline_module(model, topology, device=device)
    optimizer = make_optimizer(model)
    dp = topology.dp_size
    if topology.world_size == 1 and cfg.parallel.zero_stage == 0:
        return PlainEngine(model, optimizer, t.grad_clip, accumulation, device=device, dtype=dtype)
    ds_config = deepspeed_config(micro_batch, accumulation, dp, t.grad_clip, cfg.parallel.zero_stage, dtype,
                                 n_params=n_params)
    if topology.pp_size > 1:
        engine = PipelineEngine(model, optimizer, ds_config, vocab_size=vocab_size, device=device, dtype=dtype,
                                dp_size=dp)
        check_grid(model)
        return engine
    mpu = None
    if topology.world_size > 1:
        mpu = DeepSpeedMpu()
    return DeepSpeedEngine(model, optimizer, ds_config, mpu=mpu, device=device, dtype=dtype, dp_size=dp)
