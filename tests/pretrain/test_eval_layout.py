"""Validation NLL does not depend on the layout (issue 18.4): each sequence's t and masks are drawn
from a generator seeded by (eval seed, global sample index), so the same weights score the same
whether one rank evaluates the whole set in batches of 4 or two data-parallel ranks each evaluate
their share (global sample g on rank g % 2) in batches of 2. The multi-process version (dp=2, tp=2,
pp=2 launches against dp=1, at step 0) is in tests/parallel/test_layouts.py."""

import dataclasses

import pytest
import torch

from pretrain.config import DiffusionConfig, ModelConfig
from pretrain.diffusion.rng import SampleRNG
from pretrain.evaluate import validation_nll
from pretrain.model import build_model
from pretrain.variants import build_objective

V, L, MASK, N = 16, 16, 15, 8


def samples() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, MASK, (N, L), generator=g)
    real = torch.ones(N, L, dtype=torch.bool)
    real[3, 9:] = False  # padding
    return {"input_ids": ids, "loss_mask": real}


def batches(rows: list[int], size: int) -> list[dict[str, torch.Tensor]]:
    s = samples()
    return [{k: v[rows[i:i + size]] for k, v in s.items()} for i in range(0, len(rows), size)]


@pytest.mark.parametrize("variant", ["mdm", "block", "jigsaw"])
def test_two_ranks_score_the_same_set_as_one(variant):
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(), variant=variant, n_layers=1, d_model=32, n_heads=4, block_size=4)
    model = build_model(cfg, V, L).eval()
    objective = build_objective(DiffusionConfig(eval_t_samples=3), variant, mask_id=MASK)

    def run(rows, size, dp_rank=0, dp_size=1):
        m = validation_nll(model, objective, batches(rows, size), torch.device("cpu"), seed=5,
                           dp_rank=dp_rank, dp_size=dp_size)
        return m["val/nll"] * m["val/tokens"], m["val/tokens"]

    one, tokens = run(list(range(N)), 4)
    ranks = [run(list(range(r, N, 2)), 2, dp_rank=r, dp_size=2) for r in range(2)]
    assert sum(t for _, t in ranks) == tokens
    assert sum(s for s, _ in ranks) == pytest.approx(one, rel=1e-6)
    # the old scheme (every rank draws from the same generator in its own order) is off by far more:
    # another seed per sample moves the sum by percents, so the comparison above is not vacuous
    other = validation_nll(model, objective, batches(list(range(N)), 4), torch.device("cpu"), seed=6)
    assert abs(other["val/nll"] * other["val/tokens"] - one) > 1e-3 * one


def test_sample_rng_rows_follow_their_sample_not_their_batch():
    a = SampleRNG(1, [4, 7, 9]).rand(3, 5)
    b = SampleRNG(1, [9, 4]).rand(2, 5)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="3 rows drawn for a batch of 2"):
        SampleRNG(1, [0, 1]).rand(3)
