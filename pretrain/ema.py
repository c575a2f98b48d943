"""Exponential moving average of the weights (`train.ema`, MDLM trains with 0.9999).

    ema_t = decay * ema_{t-1} + (1 - decay) * theta_t        after every optimizer step

Each rank averages the parameters it holds (its tensor-parallel shard, its pipeline stage; a full
replica under data parallelism and ZeRO 0-2), in float32 whatever the training dtype. ZeRO-3 is
refused by the config validator: its parameters are partitioned placeholders between steps.

Validation runs on the averaged weights (`applied()` swaps them in and back), as MDLM evaluates;
checkpoints keep each rank's average in its rank file, keyed by the rank's own parameter names, so
a resumed run continues the same average and `pretrain.convert --ema` exports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names, self.params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad],
                                      strict=True)
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the trained ones for the duration of the block."""
        saved = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)
        try:
            yield
        finally:
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.clone() for n, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {len(missing)} parameters of this rank, e.g. {missing[:3]}; "
                           "was it written with another layout or model?")
        for n, s in zip(self.names, self.shadow, strict=True):
            s.copy_(state[n])
