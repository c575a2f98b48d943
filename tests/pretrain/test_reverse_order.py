"""Seed 003's blockwise reverse-order masking: clean prefix, one partly masked block, masked suffix;
the schedule's rate kept exactly in expectation; one block = MDLM's uniform masking and weight;
the training loss is an unbiased estimate of the bound eval_nll computes; config wiring."""

import dataclasses

import pytest
import torch

from pretrain.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from pretrain.diffusion import step_rng
from pretrain.diffusion.masking import UniformMasking
from pretrain.diffusion.objective import MaskedDiffusionObjective
from pretrain.diffusion.reverse_order import ReverseOrderMasking, ReverseOrderObjective
from pretrain.diffusion.rng import single
from pretrain.model import build_model
from pretrain.variants import build_objective

MASK, V, L = 3, 12, 16


def _plan(bs, alpha, real, seed=0):
    return ReverseOrderMasking(bs).plan(real, alpha, single(torch.Generator().manual_seed(seed)))


def test_masked_set_is_clean_prefix_partial_block_masked_suffix():
    B = 400
    real = torch.ones(B, L, dtype=torch.bool)
    real[:, :3] = False  # a prompt (not a target) and ragged tails
    real[::2, 13:] = False
    alpha = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plan = _plan(4, alpha, real)
    m, active = plan["masked"], plan["active"]
    assert not (m & ~real).any()
    blk = torch.arange(L) // 4
    for i in range(B):
        a = int(blk[active[i]].unique().item())  # one active block
        tgt = real[i]
        assert not m[i][tgt & (blk < a)].any()  # earlier blocks clean
        assert m[i][tgt & (blk > a)].all()  # later blocks fully masked
    # the expected masked count is exactly (1 - alpha) n: E[masked | plan] = later + p n_a
    later = (real & (blk[None, :] > blk[active.float().argmax(1)][:, None])).sum(1).double()
    expected = later + plan["p"] * plan["n_active"].double()
    torch.testing.assert_close(expected, (1 - alpha) * real.sum(1).double(), rtol=0, atol=1e-9)


def test_block_size_zero_is_mdlm_uniform_masking():
    real = torch.ones(64, L, dtype=torch.bool)
    real[:, -2:] = False
    alpha = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plan = _plan(0, alpha, real, seed=5)
    torch.testing.assert_close(plan["p"], 1 - alpha)
    uniform = UniformMasking().mask(torch.zeros(64, L, dtype=torch.long), real, alpha,
                                    single(torch.Generator().manual_seed(5)))
    assert torch.equal(plan["masked"], uniform)  # same draws, same threshold


def _tiny(block_size):
    torch.manual_seed(0)
    return build_model(ModelConfig(variant="mdm", n_layers=1, d_model=16, n_heads=2, block_size=block_size), V, L)


def _batch(B=8):
    g = torch.Generator().manual_seed(3)
    real = torch.ones(B, L, dtype=torch.bool)
    real[:, -3:] = False
    return {"input_ids": torch.randint(4, V, (B, L), generator=g), "loss_mask": real}


def test_one_block_loss_equals_mdm_loss():
    cfg = DiffusionConfig(time_sampler="antithetic", schedule="loglinear")
    mdm = build_objective(cfg, "mdm", MASK)
    rev = build_objective(dataclasses.replace(cfg, masking="reverse_order"), "mdm", MASK)
    assert isinstance(rev, ReverseOrderObjective) and type(mdm) is MaskedDiffusionObjective
    model, batch = _tiny(0), _batch()
    a, _ = mdm.training_loss(model, batch, step_rng(0, 7))
    b, _ = rev.training_loss(model, batch, step_rng(0, 7))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_is_the_jacobian_of_the_block_rate():
    """plan_weight * p = |dp/dt|, the change of variables from t to the active block's rate
    (finite differences of the plan's own p, away from block boundaries)."""
    obj = build_objective(DiffusionConfig(masking="reverse_order", schedule="cosine"), "mdm", MASK)
    real = torch.ones(1, L, dtype=torch.bool)
    real[:, :2] = False  # the first block holds 2 targets, the others 4
    masking, h = ReverseOrderMasking(4), 1e-6
    for t0 in (0.05, 0.3, 0.52, 0.77, 0.93):
        t = torch.tensor([t0], dtype=torch.float64)
        rng = single(torch.Generator().manual_seed(0))
        a, b = (masking.plan(real, obj.schedule.alpha(x), rng) for x in (t, t + h))
        assert torch.equal(a["active"], b["active"])
        dp_dt = (b["p"] - a["p"]) / h
        torch.testing.assert_close(obj.plan_weight(t, a, importance=False) * a["p"], dp_dt.abs(), rtol=1e-4, atol=0)


def test_block_size_one_bound_is_the_left_to_right_nll():
    """With blocks of one token the bound is exact: sum_j -log p(x_j | x_<j clean, x_>=j masked).
    The training loss (bell-shaped q, importance weighted) and eval_nll (uniform t) both estimate it."""
    model, batch = _tiny(1).eval(), _batch(4)
    with torch.no_grad():  # sharper predictions than at init, so the conditionals differ by context
        for prm in model.parameters():
            prm.mul_(3)
    ids, real = batch["input_ids"], batch["loss_mask"]
    n = int(real.sum())
    exact = 0.0
    with torch.no_grad():
        for j in range(L):
            x = ids.masked_fill((torch.arange(L) >= j)[None, :] & real, MASK)
            logp = model(x, None, key_padding_mask=real).double().log_softmax(-1)[:, j]
            exact -= float((logp.gather(-1, ids[:, j, None])[:, 0] * real[:, j]).sum())
    cfg = DiffusionConfig(time_sampler="bell", schedule="linear", eps=1e-4, eval_t_samples=256,
                          masking="reverse_order")
    obj = build_objective(cfg, "mdm", MASK)
    with torch.no_grad():
        evals = torch.tensor([obj.eval_nll(model, batch, torch.Generator().manual_seed(s))[0] / n for s in range(4)])
        train = torch.tensor([float(obj.training_loss(model, batch, step_rng(1, s))[0]) for s in range(400)])
    for est in (evals, train):
        se = float(est.std() / len(est) ** 0.5)
        assert abs(float(est.mean()) - exact / n) < 5 * se, (float(est.mean()), exact / n, se)


def test_config_wiring():
    cfg = load_config(None, ["model.variant=mdm", "model.block_size=8", "diffusion.masking=reverse_order"])
    assert cfg.diffusion.masking == "reverse_order"
    with pytest.raises(ConfigError, match="reverse_order works with model.variant mdm"):
        load_config(None, ["model.variant=block", "model.block_size=8", "diffusion.masking=reverse_order"])
    with pytest.raises(ValueError, match="needs model.variant=mdm"):
        build_objective(DiffusionConfig(masking="reverse_order"), "scatter", MASK)


def test_seed003_recipe_is_sudoku_mdm_with_reverse_order_masking():
    from pathlib import Path

    from pretrain.config import flatten

    tasks = Path(__file__).resolve().parents[2] / "configs" / "tasks"
    ours, mdm = (flatten(load_config(tasks / f)) for f in ("sudoku_seed003.yaml", "sudoku_mdm.yaml"))
    diff = {k for k in ours if ours[k] != mdm[k]}
    assert diff == {"name", "diffusion.masking"} and ours["diffusion.masking"] == "reverse_order"
    assert ours["model.block_size"] == 8
