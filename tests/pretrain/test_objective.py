"""Losses: MDM NELBO against a dense reference and known values, importance weights, AR CE, training, RNG."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from pretrain.config import BellConfig, DiffusionConfig, ModelConfig
from pretrain.diffusion import (
    AutoregressiveObjective,
    BetaBellSampler,
    MaskedDiffusionObjective,
    build_schedule,
    step_rng,
)
from pretrain.model import build_model
from pretrain.variants import build_objective

V, L, MASK = 16, 16, 15  # token ids 0..14, mask id 15


class UniformPredictor(nn.Module):
    """A model of the uniform distribution over the vocabulary: all logits equal."""

    def forward(self, input_ids, t=None, key_padding_mask=None):
        return torch.zeros(*input_ids.shape, V)


class Oracle(nn.Module):
    """A perfect predictor for one fixed batch: it knows the clean tokens."""

    def __init__(self, clean, confidence):
        super().__init__()
        self.clean, self.confidence = clean, confidence

    def forward(self, input_ids, t=None, key_padding_mask=None):
        return self.confidence * nn.functional.one_hot(self.clean, V).float()


def repetitive_batch(n, seed=0, pad_from=None):
    """Cyclic patterns with a random period in {2, 3, 4} and random content: learnable in-context."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        period = int(torch.randint(2, 5, (1,), generator=g))
        motif = torch.randint(0, MASK, (period,), generator=g)
        rows.append(motif.repeat(L // period + 1)[:L])
    ids = torch.stack(rows)
    real = torch.ones_like(ids, dtype=torch.bool)
    if pad_from is not None:
        real[::2, pad_from:] = False
        ids[~real] = 0
    return {"input_ids": ids, "loss_mask": real}


def tiny_model(variant="mdm", seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(variant=variant, n_layers=2, d_model=48, n_heads=4), V, L)


def mdm(**kw):
    return build_objective(dataclasses.replace(DiffusionConfig(), **kw), "mdm", MASK)


def train(model, objective, steps, seed=0, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = objective.training_loss(model, repetitive_batch(32, seed=1000 + step), step_rng(seed, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_mdm_loss_equals_dense_reference():
    model = tiny_model().eval()
    batch = repetitive_batch(6, pad_from=11)
    for weighting in ("elbo", "reweighted"):
        obj = mdm(time_sampler="bell", weighting=weighting, schedule="cosine")
        loss, stats = obj.training_loss(model, batch, step_rng(5, 9))
        # replay the same draws, then compute the loss one token at a time
        rng = step_rng(5, 9)
        t = obj.sampler.sample(6, rng)
        masked = obj.masking.mask(batch["input_ids"], batch["loss_mask"], obj.schedule.alpha(t), rng)
        x_t = torch.where(masked, MASK, batch["input_ids"])
        logits = model(x_t, t.float(), key_padding_mask=batch["loss_mask"])
        logits[..., MASK] = -math.inf  # SUBS (the default): [MASK] is never predicted
        logp = logits.log_softmax(-1)
        total, n_real = 0.0, 0
        for b in range(6):
            w = obj.schedule.weight(t[b]).item()
            if weighting == "elbo":
                w /= obj.sampler.pdf(t[b]).item()
            for i in range(L):
                if batch["loss_mask"][b, i]:
                    n_real += 1
                    if masked[b, i]:
                        total -= w * logp[b, i, batch["input_ids"][b, i]].item()
        assert not masked[~batch["loss_mask"]].any()  # padding is never masked
        assert math.isclose(loss.item(), total / n_real, rel_tol=1e-5)
        assert math.isclose(stats["masked_fraction"], (masked.sum() / batch["loss_mask"].sum()).item())
        assert stats["t_bucket_count"].sum() == 6 and stats["t_bucket_loss_sum"].shape == (10,)


@pytest.mark.parametrize(("schedule", "parameterization"),
                         [("linear", "subs"), ("loglinear", "subs"), ("cosine", "subs"), ("loglinear", "plain")])
def test_uniform_predictor_nelbo_is_log_vocab(schedule, parameterization):
    """SUBS removes [MASK] from the softmax: a uniform predictor pays log(V - 1) per masked token."""
    obj = mdm(schedule=schedule, eval_t_samples=8, parameterization=parameterization)
    n_vocab = V - 1 if parameterization == "subs" else V
    batch = repetitive_batch(64, pad_from=10)
    nll, n = obj.eval_nll(UniformPredictor(), batch, torch.Generator().manual_seed(0))
    s, eps = build_schedule(schedule), torch.tensor([1e-3, 1.0], dtype=torch.float64)
    drop = (s.alpha(eps)[0] - s.alpha(eps)[1]).item()  # integral of w (1 - alpha) on [eps, 1]
    assert n == int(batch["loss_mask"].sum())
    assert abs(nll / n - math.log(n_vocab) * drop) < 0.03 * math.log(V)
    # deterministic given the generator's seed
    assert obj.eval_nll(UniformPredictor(), batch, torch.Generator().manual_seed(0)) == (nll, n)


def test_perfect_predictor_loss_goes_to_zero():
    batch = repetitive_batch(16)
    obj = mdm()
    losses = [
        obj.training_loss(Oracle(batch["input_ids"], c), batch, step_rng(0, 1))[0].item() for c in (2, 5, 30)
    ]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 1e-9
    assert obj.eval_nll(Oracle(batch["input_ids"], 60), batch, torch.Generator().manual_seed(0))[0] < 1e-12


@pytest.fixture(scope="module")
def trained_mdm():
    return train(tiny_model(seed=1), mdm(), steps=60)


def mc_mean(obj, model, batch, draws=150):
    with torch.no_grad():
        x = torch.tensor([obj.training_loss(model, batch, step_rng(123, s))[0].item() for s in range(draws)])
    return x.mean().item(), x.std().item() / math.sqrt(draws)


def test_elbo_weighting_is_unbiased_for_every_sampler(trained_mdm):
    """Same expected loss under uniform, antithetic and bell t when weighted by w(t)/q(t).

    eps = 0.05 and Beta(2, 1.5) keep the importance weights' variance finite (see time_samplers.py).
    A trained model is needed: its per-token loss depends on t, which is what exposes wrong weights."""
    batch = repetitive_batch(32, seed=99)
    eps = 0.05
    means = {
        name: mc_mean(
            mdm(eps=eps, time_sampler=name, bell=BellConfig(family="beta", a=2.0, b=1.5)), trained_mdm, batch
        )
        for name in ("uniform", "antithetic", "bell")
    }
    ref, ref_se = means["uniform"]
    for name, (m, se) in means.items():
        assert abs(m - ref) < 4 * math.hypot(se, ref_se) + 1e-9, (name, means)
    # negative control: without the importance correction the bell sampler estimates something else
    m, se = mc_mean(
        mdm(
            eps=eps, time_sampler="bell", weighting="reweighted", bell=BellConfig(family="beta", a=2.0, b=1.5)
        ),
        trained_mdm,
        batch,
    )
    assert abs(m - ref) > 4 * math.hypot(se, ref_se), (m, se, means)
    # and the objective uses the sampler's exact density
    assert isinstance(
        mdm(eps=eps, time_sampler="bell", bell=BellConfig(family="beta")).sampler, BetaBellSampler
    )


def test_ar_loss_equals_hand_written_next_token_ce():
    model = tiny_model("ar").eval()
    batch = repetitive_batch(5, pad_from=9)
    obj = build_objective(DiffusionConfig(), "ar", MASK)
    assert isinstance(obj, AutoregressiveObjective)
    loss, stats = obj.training_loss(model, batch, step_rng(0, 0))
    logp = model(batch["input_ids"], key_padding_mask=batch["loss_mask"]).log_softmax(-1)
    total, n = 0.0, 0
    for b in range(5):
        for i in range(L - 1):
            if batch["loss_mask"][b, i + 1]:
                total -= logp[b, i, batch["input_ids"][b, i + 1]].item()
                n += 1
    assert math.isclose(loss.item(), total / n, rel_tol=1e-5)
    nll, count = obj.eval_nll(model, batch)
    assert count == n and math.isclose(nll, total, rel_tol=1e-5)
    assert stats["t_bucket_count"].sum() == 0


@pytest.mark.parametrize("variant", ["mdm", "ar"])
def test_training_lowers_the_loss(variant):
    model = tiny_model(variant, seed=2)
    obj = build_objective(DiffusionConfig(time_sampler="antithetic"), variant, MASK)
    val = repetitive_batch(64, seed=7)

    def per_token():
        nll, n = obj.eval_nll(model.eval(), val, torch.Generator().manual_seed(0))
        model.train()
        return nll / n

    before = per_token()
    train(model.train(), obj, steps=150, seed=3)
    after = per_token()
    # AR learns the periodic continuation fast; MDM learns more slowly (its NELBO must also
    # predict heavily masked sequences), so its bar is lower but still far outside noise
    assert before > 0.9 * math.log(V), before
    assert after < (0.5 if variant == "ar" else 0.7) * before, (before, after)


def test_step_rng_determinism_and_rank_separation():
    def draws(seed, step, rank, size=2):
        r = step_rng(seed, step, rank, size)
        return torch.rand(4, generator=r.shared), r.rand(4)

    s0, l0 = draws(0, 5, 0)
    s0b, l0b = draws(0, 5, 0)
    s1, l1 = draws(0, 5, 1)
    assert torch.equal(s0, s0b) and torch.equal(l0, l0b)  # same (seed, step, dp_rank): same draws
    assert torch.equal(s0, s1) and not torch.equal(l0, l1)  # other dp rank: same shared, other rows
    assert not torch.equal(s0, draws(0, 6, 0)[0]) and not torch.equal(s0, draws(1, 5, 0)[0])
    assert not torch.equal(s0, l0)  # shared and per-sample streams differ
    # layout invariance: a sample's draw is the same at dp=1 and dp=2 (rank r holds rows r, r+2, ...)
    whole = step_rng(0, 5, 0, 1).rand(8, 3)
    torch.testing.assert_close(step_rng(0, 5, 0, 2).rand(4, 3), whole[0::2], rtol=0, atol=0)
    torch.testing.assert_close(step_rng(0, 5, 1, 2).rand(4, 3), whole[1::2], rtol=0, atol=0)
    # ... and whatever the micro-batching: micro-batch 1 of 2 on rank 1 of 2 holds global rows 5 and 7
    torch.testing.assert_close(step_rng(0, 5, 1, 2, micro=1, n_micro=2).rand(2, 3), whole[[5, 7]], rtol=0, atol=0)
    # through the objective: identical masks for the same dp_rank, different masks across dp ranks
    obj, batch = mdm(time_sampler="antithetic"), repetitive_batch(8)
    fractions = [
        obj.training_loss(UniformPredictor(), batch, step_rng(0, 1, r, 2))[1]["masked_fraction"]
        for r in (0, 0, 1)
    ]
    assert fractions[0] == fractions[1] != fractions[2]
    with pytest.raises(ValueError):
        step_rng(0, 0, dp_rank=2, dp_size=2)


def test_build_objective_rejects_unknown_variant():
    assert isinstance(build_objective(DiffusionConfig(), "mdm", MASK), MaskedDiffusionObjective)
    with pytest.raises(ValueError, match="variant"):
        build_objective(DiffusionConfig(), "diffusion-lm", MASK)
