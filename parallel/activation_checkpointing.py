"""Activation checkpointing (`train.activation_checkpointing`): recompute a transformer block's
activations in the backward pass instead of holding them from the forward, as torchtitan and
Megatron offer. Memory for compute: a checkpointed block keeps only its input between forward and
backward and runs its forward twice (about +1/3 of the step's FLOPs when every block is checkpointed).

    none      nothing is recomputed
    all       every block of `model.blocks`
    every_k   blocks 0, k, 2k, ... (`train.activation_checkpointing_k`; 1 = all): a middle ground
              between memory and recompute (torchtitan's "selective" layer checkpointing)

Applied from here, outside the model: the model stays plain PyTorch. Each selected block's
`forward` is replaced, on that instance, by one that runs the original under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`. The block itself stays in the
`nn.ModuleList` unchanged, so parameter names, state dicts, checkpoints, the EMA's names and the
pipeline's plain-model keys are exactly those of the plain model (a wrapper module, like torch's
`checkpoint_wrapper`, would insert a name into every parameter path). The non-reentrant checkpoint
restores the RNG state for the recompute (dropout draws the same mask) and works with autocast,
tensor-parallel layers and DeepSpeed's ZeRO hooks (which fire on the sub-modules the recompute
calls). Apply after tensor parallelism (which replaces sub-modules) and before the pipeline split
(whose stages hold the same block objects).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "all", "every_k")


def checkpointed_blocks(n_blocks: int, mode: str, k: int = 2) -> list[int]:
    """Indices of the blocks to checkpoint under `mode` (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing = {mode!r}: must be one of {', '.join(MODES)}")
    if mode == "none":
        return []
    if mode == "all":
        return list(range(n_blocks))
    if k < 1:
        raise ValueError(f"train.activation_checkpointing_k = {k}: must be >= 1")
    return list(range(0, n_blocks, k))


def _checkpointed_forward(inner, *args, **kwargs):
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str, k: int = 2) -> list[int]:
    """Checkpoint the selected blocks of `model.blocks` in place; returns their indices."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"activation checkpointing needs model.blocks as an nn.ModuleList, got {type(blocks)}")
    chosen = checkpointed_blocks(len(blocks), mode, k)
    for i in chosen:
        block = blocks[i]
        if getattr(block, "activation_checkpointed", False):
            continue  # applied twice: once is enough
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block.activation_checkpointed = True
    return chosen


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block, "activation_checkpointed", False))
