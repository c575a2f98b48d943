"""MDLM's SUBS parameterisation: the objectives' losses equal a dense per-position reference, never
exceed the plain softmax's, and the samplers never draw [MASK] nor change a committed token."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from pretrain.config import DiffusionConfig, ModelConfig, load_config
from pretrain.diffusion import step_rng
from pretrain.diffusion.objective import subs_log_probs
from pretrain.model import build_model
from pretrain.sample import SamplerConfig, generate
from pretrain.variants import VARIANTS, build_objective

V, L, MASK, BL = 12, 16, 11, 4


class RandomLogits(nn.Module):
    """Fixed random logits (one draw per position, whatever the input), [MASK]'s raised by 3 so
    that the plain softmax gives it real mass; records what every forward was called with."""

    def __init__(self, seed=0, block=BL):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(64, L, V, generator=g)
        self.table[..., MASK] += 3.0
        self.block = block
        self.calls: list[tuple[torch.Tensor, dict]] = []

    def block_len(self, n):
        return self.block

    def forward(self, x_t, t=None, key_padding_mask=None, **kw):
        self.calls.append((x_t.clone(), kw))
        return self.table[: x_t.shape[0], : x_t.shape[1]].clone().requires_grad_()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (n, L), generator=g)
    real = torch.ones(n, L, dtype=torch.bool)
    real[::2, 13:] = False  # padded rows: never masked, never scored
    ids[~real] = 0
    return {"input_ids": ids, "loss_mask": real}


def objective(variant, parameterization="subs", **kw):
    cfg = dataclasses.replace(DiffusionConfig(), parameterization=parameterization, **kw)
    return build_objective(cfg, variant, MASK)


def dense_subs_nelbo_term(logits, x_t, x0, real, w_pos):
    """sum over real positions l of w_l * -log p_SUBS(x0_l | x_t), written one position at a time
    from MDLM's definition (no objective code): at an unmasked position p is the point mass on
    x_t (carry-over), at a masked one the softmax over the vocabulary without [MASK]."""
    total = 0.0
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            if not real[b, i]:
                continue
            if x_t[b, i] != MASK:
                p_target = 1.0 if x_t[b, i] == x0[b, i] else 0.0
            else:
                z = [math.exp(float(logits[b, i, v])) for v in range(V) if v != MASK]
                p_target = math.exp(float(logits[b, i, x0[b, i]])) / sum(z)
            total += -w_pos[b][i] * math.log(p_target)
    return total


@pytest.mark.parametrize("variant", ["mdm", "scatter", "block", "jigsaw"])
def test_training_loss_equals_dense_subs_reference(variant):
    """The objective's loss on random logits equals the per-position SUBS NELBO term with the
    objective's own draws (the masked positions read back from what the model was given)."""
    data = batch()
    x0, real = data["input_ids"], data["loss_mask"]
    obj = objective(variant, time_sampler="antithetic", schedule="cosine")
    model = RandomLogits()
    loss, _ = obj.training_loss(model, data, step_rng(3, 4))
    x_t, kw = model.calls[-1]
    assert ((x_t == MASK) <= real).all() and (x_t == MASK).any()
    B = x0.shape[0]
    if variant == "jigsaw":  # weight per sequence from its count of masked blocks
        n = L // BL
        m = (~kw["revealed_blocks"]).sum(1)
        w_seq = obj.sequence_weight(m, n)
        w_pos = [[float(w_seq[b])] * L for b in range(B)]
    elif variant == "block":  # one t per (sequence, block): replay the sampler's first draw
        t = obj.sampler.sample(B * (L // BL), step_rng(3, 4)).view(B, -1)
        w_blk = obj.sequence_weight(t)
        w_pos = [[float(w_blk[b, i // BL]) for i in range(L)] for b in range(B)]
    else:
        t = obj.sampler.sample(B, step_rng(3, 4))
        w_seq = obj.sequence_weight(t)
        w_pos = [[float(w_seq[b])] * L for b in range(B)]
    ref = dense_subs_nelbo_term(model.table, x_t, x0, real, w_pos) / int(real.sum())
    assert math.isclose(loss.item(), ref, rel_tol=1e-5)
    # the dense helper is the same distribution
    logp = subs_log_probs(model.table[:B], x_t, MASK)
    assert torch.isneginf(logp[..., MASK][x_t == MASK]).all()
    unmasked = x_t != MASK
    assert (logp.gather(-1, x_t[..., None])[..., 0][unmasked] == 0).all()


@pytest.mark.parametrize("variant", ["mdm", "scatter", "block", "jigsaw"])
def test_subs_loss_is_at_most_plain_and_equals_plain_without_mask_logit(variant):
    data = batch()
    subs, plain = objective(variant), objective(variant, "plain")
    model = RandomLogits()
    l_subs = subs.training_loss(model, data, step_rng(0, 7))[0].item()
    l_plain = plain.training_loss(model, data, step_rng(0, 7))[0].item()
    assert l_subs < l_plain  # the same draws: every term loses [MASK]'s mass
    no_mask = RandomLogits()
    no_mask.table[..., MASK] = -math.inf  # plain on a model that never predicts [MASK] is SUBS
    assert math.isclose(plain.training_loss(no_mask, data, step_rng(0, 7))[0].item(), l_subs, rel_tol=1e-6)
    # evaluation NLL, too (same fixed generator)
    e_subs = subs.eval_nll(model, data, torch.Generator().manual_seed(5))[0]
    e_plain = plain.eval_nll(model, data, torch.Generator().manual_seed(5))[0]
    e_ref = plain.eval_nll(no_mask, data, torch.Generator().manual_seed(5))[0]
    assert e_subs < e_plain and math.isclose(e_subs, e_ref, rel_tol=1e-6)


def test_subs_gradient_never_reaches_the_mask_logit():
    data = batch()
    model = RandomLogits()
    logits = model.table[:6].clone().requires_grad_()
    model.forward = lambda x_t, t=None, key_padding_mask=None, **kw: logits  # noqa: ARG005
    loss, _ = objective("mdm").training_loss(model, data, step_rng(0, 1))
    loss.backward()
    assert (logits.grad[..., MASK] == 0).all() and logits.grad.abs().sum() > 0


def test_parameterization_is_a_config_key_defaulting_to_subs():
    assert DiffusionConfig().parameterization == "subs"
    assert objective("mdm").exclude == MASK and objective("mdm", "plain").exclude is None
    assert load_config(None, ["diffusion.parameterization=plain"]).diffusion.parameterization == "plain"
    with pytest.raises(Exception, match="diffusion.parameterization"):
        load_config(None, ["diffusion.parameterization=sedd"])


class MaskLover(nn.Module):
    """A real tiny model whose [MASK] logit is raised by 50: a plain softmax would draw [MASK]
    almost surely. Named `module` inside so the samplers treat it as a wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, x, *args, **kwargs):
        out = self.module(x, *args, **kwargs).clone()
        out[..., MASK] += 50.0
        return out


CASES = [(v, s) for v, spec in VARIANTS.items() if v != "ar" for s in spec.samplers]


@pytest.mark.parametrize(("variant", "sampler"), CASES)
def test_no_sampler_draws_mask_or_changes_a_committed_token(variant, sampler):
    torch.manual_seed(0)
    model = MaskLover(build_model(ModelConfig(variant=variant, n_layers=1, d_model=32, n_heads=2,
                                              block_size=BL), V, L)).eval()
    x = torch.randint(0, MASK, (3, L))
    gen = torch.rand(3, L, generator=torch.Generator().manual_seed(1)) < 0.6
    gen[:, -1] = True
    for temperature in (0.0, 1.0):
        cfg = SamplerConfig(name=sampler, temperature=temperature, steps=3)
        out = generate(model, x, gen, mask_id=MASK, cfg=cfg).tokens
        assert not (out == MASK).any(), (variant, sampler, temperature)
        assert torch.equal(out[~gen], x[~gen])


class TwoBlockField(nn.Module):
    """Jigsaw probe fixture: block 0 puts almost all mass on [MASK] and is uniform over the real
    tokens (maximal entropy under SUBS); block 1 is confident about token 5 (low entropy)."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, x, *args, **kwargs):
        out = torch.zeros(*x.shape, V)
        out[:, :BL, MASK] = 40.0
        out[:, BL:, 5] = 6.0
        return out


def test_jigsaw_entropy_order_ignores_mask_mass():
    """The lowest-entropy block is decoded first on the SUBS distribution: block 1. With [MASK] in
    the entropy, block 0 (nearly all mass on [MASK]) would look certain and go first."""
    torch.manual_seed(0)
    inner = build_model(ModelConfig(variant="jigsaw", n_layers=1, d_model=32, n_heads=2, block_size=BL), V, 2 * BL)
    rec = TwoBlockField(inner)
    seen = []
    forward = rec.forward

    def spy(x, *a, **k):
        seen.append(k["revealed_blocks"].clone())
        return forward(x, *a, **k)

    rec.forward = spy
    x = torch.zeros(1, 2 * BL, dtype=torch.long)
    gen = torch.ones(1, 2 * BL, dtype=torch.bool)
    out = generate(rec, x, gen, mask_id=MASK, cfg=SamplerConfig(name="jigsaw", jigsaw_order="entropy")).tokens
    # after the first block is committed, the revealed set holds exactly that block
    after_first = [r for r in seen if r.any()][0]
    assert after_first.tolist() == [[False, True]]
    assert (out[0, BL:] == 5).all() and not (out == MASK).any()
