"""The variant table (pretrain/variants.py) and the diffusion registries: every entry is consistent
with the code that uses it, and the config's allowed values are the registries' keys."""

import dataclasses
import math
import re

import pytest
import torch

from pretrain.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from pretrain.diffusion import (
    MASKING_POLICIES,
    SCHEDULES,
    TIME_SAMPLERS,
    LinearSchedule,
    LossStats,
    MaskingSpec,
    Objective,
    UniformMasking,
    UniformSampler,
    register_masking,
    register_time_sampler,
    step_rng,
)
from pretrain.diffusion.reverse_order import ReverseOrderObjective
from pretrain.model import build_model, cache_support
from pretrain.model.attention_masks import BASE_MASKS, block_causal_mask, causal_mask, is_two_stream
from pretrain.model.kv_cache import CACHEABLE_VARIANTS
from pretrain.sample import SAMPLERS, SamplerConfig, generate
from pretrain.variants import VARIANTS, build_objective, register_variant, resolve_sampler, samplers

V, L, MASK, BL = 12, 16, 3, 4


def tiny(variant: str, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(variant=variant, n_layers=1, d_model=16, n_heads=2, block_size=BL, **kw), V, L)


def batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    real = torch.ones(n, L, dtype=torch.bool)
    real[0, -3:] = False
    return {"input_ids": torch.randint(4, V, (n, L), generator=g), "loss_mask": real,
            "density": torch.rand(n, L, generator=g)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_models_tables_agree_with_the_entry(variant):
    spec = VARIANTS[variant]
    assert BASE_MASKS[variant] is spec.mask
    for streams in (1, 2):
        assert is_two_stream(variant, streams) == (spec.streams(ModelConfig(jigsaw_streams=streams)) == 2)
        assert tiny(variant, jigsaw_streams=streams).two_stream == (spec.streams(ModelConfig(jigsaw_streams=streams)) == 2)
    assert (cache_support(variant, BL, False) is None) == spec.kv_cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_declared_sampler_runs_and_every_other_is_refused_with_the_reason(variant):
    spec = VARIANTS[variant]
    model = tiny(variant)
    x = torch.randint(4, V, (2, L), generator=torch.Generator().manual_seed(1))
    gen = torch.zeros(2, L, dtype=torch.bool)
    gen[:, 5:13] = True
    assert resolve_sampler(variant, "auto") == (spec.default_sampler or spec.samplers[0])
    for name in ("auto", *spec.samplers):
        out = generate(model, x, gen, mask_id=MASK, cfg=SamplerConfig(name=name, steps=2))
        assert torch.equal(out.tokens[~gen], x[~gen]) and not (out.tokens == MASK).any() and out.nfe > 0, name
    refused = [s for s in samplers() if s not in spec.samplers]
    assert refused  # every variant refuses some sampler
    for name in refused:
        with pytest.raises(ValueError, match=re.escape(spec.refusal) if spec.refusal else "does not fit") as e:
            generate(model, x, gen, mask_id=MASK, cfg=SamplerConfig(name=name))
        assert f"use one of {', '.join(spec.samplers)}" in str(e.value)
    assert SAMPLERS == ("auto", *samplers())


def test_scatter_gives_its_reason_for_every_any_order_sampler():
    for name in ("ancestral", "confidence", "entropy", "margin", "random"):
        with pytest.raises(ValueError, match="offset by offset"):
            resolve_sampler("scatter", name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_allowed_masking_policy_trains_and_every_other_is_refused(variant):
    spec = VARIANTS[variant]
    assert set(spec.masking) <= set(MASKING_POLICIES)
    model = tiny(variant)
    for policy in MASKING_POLICIES:
        cfg = DiffusionConfig(masking=policy, eval_t_samples=2)
        overrides = [f"model.variant={variant}", f"model.block_size={BL}", f"diffusion.masking={policy}",
                     "data.density.annotator=unigram"]
        if policy not in spec.masking:
            with pytest.raises(ValueError, match="needs model.variant="):
                build_objective(cfg, variant, MASK)
            with pytest.raises(ConfigError, match=f"{policy} works with model.variant"):
                load_config(None, overrides)
            continue
        assert load_config(None, overrides).diffusion.masking == policy
        objective = build_objective(cfg, variant, MASK)
        assert isinstance(objective, Objective)
        if MASKING_POLICIES[policy].objective is not None:
            assert type(objective) is MASKING_POLICIES[policy].objective
        loss, stats = objective.training_loss(model, batch(), step_rng(0, 1))
        assert isinstance(stats, LossStats) and math.isfinite(stats.loss) and stats.loss == float(loss.detach())
        assert stats.n_tokens > 30 and stats.t_bucket_count.shape == (10,)  # 45 real tokens (ar: 42 targets)
        nll, n = objective.eval_nll(model, batch(), torch.Generator().manual_seed(0))
        assert math.isfinite(nll) and n == stats.n_tokens  # the same tokens are scored


def test_reverse_order_brings_its_own_objective_for_mdm():
    assert isinstance(build_objective(DiffusionConfig(masking="reverse_order"), "mdm", MASK), ReverseOrderObjective)


def test_loss_stats_keep_the_keys_the_trainer_reads():
    _, stats = build_objective(DiffusionConfig(), "mdm", MASK).training_loss(tiny("mdm"), batch(), step_rng(0, 0))
    assert list(stats.to_dict()) == ["loss", "masked_fraction", "n_tokens", "t_bucket_loss_sum", "t_bucket_count"]
    assert stats["n_tokens"] == stats.n_tokens and stats.get("masked_fraction") == stats.masked_fraction
    assert stats.get("grad_norm", 1.5) == 1.5
    with pytest.raises(KeyError):
        stats["grad_norm"]
    _, ar = build_objective(DiffusionConfig(), "ar", MASK).training_loss(tiny("ar"), batch(), step_rng(0, 0))
    assert ar.masked_fraction == 0.0 and int(ar.t_bucket_count.sum()) == 0


@pytest.fixture
def restore_registries():
    saved = [(r, r.copy()) for r in (VARIANTS, TIME_SAMPLERS, MASKING_POLICIES, SCHEDULES, BASE_MASKS,
                                     CACHEABLE_VARIANTS)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)


def test_registering_an_entry_makes_the_config_accept_it(restore_registries):
    keys = {"diffusion.time_sampler": "dummy_t", "diffusion.masking": "dummy_m", "diffusion.schedule": "dummy_s",
            "model.variant": "dummy_v"}
    for key, name in keys.items():
        with pytest.raises(ConfigError, match=f"`{re.escape(key)}` = '{name}': must be one of"):
            load_config(None, [f"{key}={name}"])

    @register_time_sampler("dummy_t")
    def dummy_sampler(eps, stratified, t_min, t_max, options):
        return UniformSampler(eps, stratified, t_min=t_min, t_max=t_max)

    register_masking(MaskingSpec("dummy_m", lambda cfg: UniformMasking()))
    SCHEDULES["dummy_s"] = LinearSchedule
    register_variant(dataclasses.replace(VARIANTS["mdm"], name="dummy_v", masking=("uniform", "dummy_m")))
    for key, name in keys.items():
        only_dummy_v = ["model.variant=dummy_v"] if key == "diffusion.masking" else []  # its entry allows it
        assert load_config(None, [f"{key}={name}", *only_dummy_v]) is not None
    with pytest.raises(ConfigError, match="dummy_m works with model.variant dummy_v only"):
        load_config(None, ["diffusion.masking=dummy_m"])
    cfg = load_config(None, [f"{key}={name}" for key, name in keys.items()])
    objective = build_objective(cfg.diffusion, cfg.model.variant, MASK)
    assert type(objective.sampler) is UniformSampler and isinstance(objective.masking, UniformMasking)
    assert type(objective.schedule) is LinearSchedule
    with pytest.raises(ValueError, match="already registered"):
        register_time_sampler("dummy_t")(dummy_sampler)


def test_a_new_variant_is_one_entry_plus_its_mask_and_objective(restore_registries):
    """A causal-inside-blocks variant that nothing else knows of: the model builds and attends with its
    mask, its objective trains, its sampler decodes, the KV cache follows its entry."""

    def blockwise_causal(seq_len, block_size, device):
        return block_causal_mask(seq_len, block_size, device) & causal_mask(seq_len, block_size, device)

    register_variant(dataclasses.replace(VARIANTS["ar"], name="dummy_v", mask=blockwise_causal))
    assert BASE_MASKS["dummy_v"] is blockwise_causal and cache_support("dummy_v", BL, False) is None
    model = tiny("dummy_v")
    x = batch()
    loss, stats = build_objective(DiffusionConfig(), "dummy_v", MASK).training_loss(model, x, step_rng(0, 0))
    loss.backward()
    assert math.isfinite(stats.loss) and model.tok_emb.weight.grad is not None
    gen = torch.zeros(3, L, dtype=torch.bool)
    gen[:, 6:] = True
    out = generate(model, x["input_ids"], gen, mask_id=MASK, cfg=SamplerConfig(name="auto"))
    assert out.kv_cache and torch.equal(out.tokens[~gen], x["input_ids"][~gen])
    BASE_MASKS["conflict"] = causal_mask
    with pytest.raises(ValueError, match="another base mask"):
        register_variant(dataclasses.replace(VARIANTS["mdm"], name="conflict"))
