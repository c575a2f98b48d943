"""Per-step random generators for the diffusion draws, correct under data/tensor/pipeline parallelism.

Rules (docs/ARCHITECTURE.md, "Correctness rules under parallelism"):
- `shared` depends on (seed, step) only: identical on every rank. It draws what must agree across
  the global batch, e.g. the offset of the stratified ("antithetic") t grid.
- Per-sample draws (each sequence's t, each token's mask) come from `rand(...)`: one draw for the
  whole GLOBAL batch from a (seed, step) stream, of which data-parallel rank r keeps the rows of its
  own samples (global positions r, r + dp, r + 2 dp, ...: the loader deals global sample g to rank
  g % dp). Data-parallel ranks therefore get different draws, tensor/pipeline peers (same dp_rank)
  identical ones, and a sample gets the same t and mask whatever the number of ranks: a run at
  dp=2 reproduces dp=1's loss exactly (the layout-equivalence test relies on it). The cost is that
  every rank draws dp x its own share of uniforms, microseconds next to a training step. Never seed
  from the global rank.
- Generators live on the CPU and draws are moved to the device afterwards, so a run draws the same
  t and masks on CPU and GPU (device-independent determinism; the cost is a small host-to-device copy).
Seeds go through numpy's SeedSequence so nearby (seed, step, rank) tuples give unrelated streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_SHARED, _SAMPLES, _EVAL = 0x5348, 0x534D, 0x4556  # stream tags: the streams never coincide


@dataclass
class StepRNG:
    shared: torch.Generator  # same on every rank (seed, step): draws of the step as a whole
    samples: torch.Generator  # same on every rank (seed, step): per-sample draws, see `rand`
    dp_rank: int = 0
    dp_size: int = 1
    micro: int = 0  # which micro-batch of the step (gradient accumulation)
    n_micro: int = 1  # micro-batches per optimizer step

    def rand(self, *local_shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """U[0, 1) draws for this rank's samples of this micro-batch: [B_local, ...], cut from one draw
        for the whole global batch of the step, so a sample's draw depends neither on how many
        data-parallel ranks share the batch nor on how it is split into micro-batches."""
        n_local, *rest = local_shape
        n_global = n_local * self.dp_size * self.n_micro
        draw = torch.rand((n_global, *rest), generator=self.samples, dtype=dtype)
        return draw[self.global_rows(n_local)]

    def global_rows(self, n_local: int) -> torch.Tensor:
        """Positions of this rank's samples of this micro-batch in the step's global batch: rank r's
        j-th sample of micro-batch i is its (i * n_local + j)-th sample, global sample (.) * dp + r."""
        own = torch.arange(self.micro * n_local, (self.micro + 1) * n_local)
        return own * self.dp_size + self.dp_rank


class SampleRNG:
    """Evaluation draws keyed by sample: row b of every `rand` comes from its own generator, seeded
    from (seed, global sample index of row b). A validation sequence therefore gets the same t and
    masks whichever rank, batch or layout evaluates it, and the validation NLL of given weights is
    the same number at any dp/tp/pp (the layout only decides who evaluates which sequence).
    Successive `rand` calls continue each row's stream. Cost: one small draw per row and call,
    negligible next to the model's forward on the batch."""

    def __init__(self, seed: int, sample_index: torch.Tensor | list[int]):
        self.generators = [_generator(_EVAL, seed, int(g)) for g in sample_index]

    def rand(self, *local_shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        n_local, *rest = local_shape
        if n_local != len(self.generators):
            raise ValueError(f"{n_local} rows drawn for a batch of {len(self.generators)} samples")
        return torch.stack([torch.rand(rest, generator=g, dtype=dtype) for g in self.generators])


def eval_rng(rng: torch.Generator | StepRNG | SampleRNG) -> StepRNG | SampleRNG:
    """What an objective's eval_nll draws from: a SampleRNG (the trainer's validation), or one plain
    generator for the whole batch (tests, quick checks)."""
    return single(rng) if isinstance(rng, torch.Generator) else rng


def single(generator: torch.Generator) -> StepRNG:
    """A StepRNG drawing everything from one generator on one rank (evaluation, tests)."""
    return StepRNG(shared=generator, samples=generator)


def _generator(*entropy: int) -> torch.Generator:
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state) & ((1 << 63) - 1))


def step_rng(seed: int, step: int, dp_rank: int = 0, dp_size: int = 1, micro: int = 0, n_micro: int = 1) -> StepRNG:
    """The draws of optimizer step `step` for micro-batch `micro` of `n_micro` on data-parallel rank
    `dp_rank` of `dp_size`. Every micro-batch of a step gets fresh generators with the same seeds,
    so each cuts its own rows out of identical global draws."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size = {dp_size})")
    if not 0 <= micro < n_micro:
        raise ValueError(f"micro {micro} is not in [0, n_micro = {n_micro})")
    return StepRNG(
        shared=_generator(_SHARED, seed, step),
        samples=_generator(_SAMPLES, seed, step),
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro=micro,
        n_micro=n_micro,
    )
