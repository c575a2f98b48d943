"""The model variants, one table: what each needs, in one place.

A variant (`model.variant`) is one backbone (pretrain/model/transformer.py) with its own attention
mask, trained by its own objective and decoded by its own samplers. Its `VariantSpec` says:

    mask          the builder of its single-stream [L, L] base mask (pretrain/model/attention_masks.py)
    streams       1, or 2 for the two-stream [x_t | x_0] training pass (a function of the model config:
                  jigsaw has both forms, `model.jigsaw_streams`)
    objective     the builder of its training loss and eval NLL (pretrain/diffusion/), from the diffusion
                  config, the mask id and the model config
    samplers      the decoding samplers (pretrain/sample.py) that sample the model it trains
                  (`default_sampler`, or the first, is `auto`'s choice). Any other sampler is refused,
                  with `refusal` as the reason where there is more to say than "not this model's decoding"
    kv_cache      whether a clean-prefix KV cache is exact for it (pretrain/model/kv_cache.py)
    masking       the `diffusion.masking` policies it trains with (pretrain/diffusion/masking.py)
    elbo_variance how the config validator measures the variance of `elbo`'s importance weights under a
                  non-uniform time sampler (None: no t, nothing to check)
    constraints   further config checks of its own, (cfg) -> problems

Config validation (the allowed variants, masking policies, the `elbo` check), the sampler refusals
(`resolve_sampler`), the objective choice (`build_objective`) and the evaluate path read this table.
A new variant is one `register_variant(VariantSpec(...))` entry plus its mask and its objective.
The model dispatches on its own per-variant tables (attention_masks.BASE_MASKS,
kv_cache.CACHEABLE_VARIANTS, is_two_stream): this module imports the model, so the model cannot
import it; `register_variant` installs a new entry's base mask and cacheability there, and
tests/pretrain/test_variant_registry.py checks that the tables and the entries agree. (A new
two-stream variant also needs its [x_t | x_0] mask in attention_masks.two_stream_mask.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pretrain.diffusion.blockwise import BlockDiffusionObjective, JigsawObjective
from pretrain.diffusion.masking import MASKING_POLICIES, masking_from_config
from pretrain.diffusion.objective import (
    AutoregressiveObjective,
    MaskedDiffusionObjective,
    Objective,
    diffusion_kwargs,
)
from pretrain.diffusion.schedules import Schedule, build_schedule
from pretrain.diffusion.time_samplers import (
    ELBO_VARIANCE_LIMIT,
    TIME_SAMPLERS,
    TimeSampler,
    build_time_sampler,
    elbo_variance_ratio,
)
from pretrain.model import attention_masks as masks
from pretrain.model.kv_cache import CACHEABLE_VARIANTS

if TYPE_CHECKING:
    from pretrain.config import Config, DiffusionConfig

# The any-order masked-diffusion samplers (pretrain/sample.py): which masked position to reveal next
# is theirs to choose (MDLM's ancestral step, or LLaDA's fixed-count samplers by score)
ANY_ORDER_SAMPLERS = ("ancestral", "confidence", "entropy", "margin", "random")

ObjectiveBuilder = Callable[["DiffusionConfig", int, Any], Objective]


@dataclass(frozen=True)
class VariantSpec:
    name: str
    summary: str
    mask: Callable[[int, int, torch.device], torch.Tensor | None]
    objective: ObjectiveBuilder
    samplers: tuple[str, ...]
    default_sampler: str = ""  # what `auto` decodes with; "" = the first of `samplers`
    streams: Callable[[Any], int] = lambda model_cfg: 1
    refusal: str = ""
    kv_cache: bool = False
    masking: tuple[str, ...] = ("uniform",)
    # (cfg, schedule, sampler) -> (variance ratio to uniform t's, where the weights are measured)
    elbo_variance: Callable[[Config, Schedule, TimeSampler], tuple[float, str]] | None = None
    constraints: Callable[[Config], list[str]] = field(default=lambda cfg: [])


VARIANTS: dict[str, VariantSpec] = {}


def register_variant(spec: VariantSpec) -> VariantSpec:
    """Add `spec` to the table, and its base mask and cacheability to the model's own tables (which
    the model dispatches on: it cannot import this module, which imports it)."""
    if spec.name in VARIANTS:
        raise ValueError(f"model variant {spec.name!r} is already registered")
    if masks.BASE_MASKS.setdefault(spec.name, spec.mask) is not spec.mask:
        raise ValueError(f"variant {spec.name!r}: attention_masks.BASE_MASKS holds another base mask for it")
    if spec.kv_cache:
        CACHEABLE_VARIANTS.add(spec.name)
    VARIANTS[spec.name] = spec
    return spec


def variant_spec(name: str) -> VariantSpec:
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


# --------------------------------------------------------------------------------------------
# Objective builders and the `elbo` weight checks the entries share
# --------------------------------------------------------------------------------------------


def _masked_diffusion(cls: type[MaskedDiffusionObjective]) -> ObjectiveBuilder:
    """cls with the configured masking policy; a policy that brings its own objective (reverse_order)
    replaces cls (the variant's `masking` says whether it may)."""

    def build(cfg: DiffusionConfig, mask_id: int, model_cfg: Any) -> Objective:
        policy = MASKING_POLICIES[cfg.masking]
        if policy.objective is not None:
            return policy.objective(**diffusion_kwargs(cfg, mask_id))
        return cls(**diffusion_kwargs(cfg, mask_id), masking=masking_from_config(cfg))

    return build


def _continuous_elbo_variance(cfg: Config, schedule: Schedule, sampler: TimeSampler) -> tuple[float, str]:
    """w(t)/q(t), one t per sequence (or block): time_samplers.elbo_variance_ratio."""
    eps = cfg.diffusion.eps
    t = torch.tensor([max(eps, 1e-12)], dtype=torch.float64)
    w_eps = float(schedule.weight(t)[0] / sampler.pdf(t)[0])
    return (elbo_variance_ratio(schedule, sampler),
            f"w(t)/q(t) = {w_eps:.3g} at t = eps (uniform t: {float(schedule.weight(t)[0]) * (1 - eps):.3g})")


def _jigsaw_elbo_variance(cfg: Config, schedule: Schedule, sampler: TimeSampler) -> tuple[float, str]:
    """Jigsaw's weights 1/(m P_q(m)) are discrete: the ratio is taken over the masked-block counts m."""
    m, f = cfg.model, cfg.diffusion
    n = cfg.data.seq_len // m.block_size if m.block_size else 1
    p_q = JigsawObjective(schedule, sampler, 0).count_probabilities(n)
    p_u = JigsawObjective(schedule, build_time_sampler("uniform", f.eps), 0).count_probabilities(n)
    ratio = math.inf if bool((p_q <= 0).any()) else float((1.0 / p_q).sum() / (1.0 / p_u).sum())
    return ratio, f"1/(m P_q(m)) over the {n} masked-block counts"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_DENSITY = ("uniform", "density_priority", "complementary")

register_variant(VariantSpec(
    name="ar",
    summary="causal next-token model",
    mask=masks.causal_mask,
    objective=lambda cfg, mask_id, model_cfg: AutoregressiveObjective(loss_buckets=cfg.loss_buckets),
    samplers=("ar",),
    kv_cache=True,
))
def _trained_as_mdm(name: str, summary: str, mask, samplers: tuple[str, ...], **more) -> VariantSpec:
    """A variant trained by the MDM objective as is, one continuous t per sequence (mdm, and scatter:
    only its mask differs, blockwise.py)."""
    return VariantSpec(name=name, summary=summary, mask=mask, objective=_masked_diffusion(MaskedDiffusionObjective),
                       samplers=samplers, elbo_variance=_continuous_elbo_variance, **more)


register_variant(_trained_as_mdm(
    "mdm", "bidirectional masked diffusion (MDLM)", masks.bidirectional_mask, ANY_ORDER_SAMPLERS,
    default_sampler="confidence",  # LLaDA's low-confidence remasking
    masking=(*_DENSITY, "reverse_order"),
))
register_variant(VariantSpec(
    name="block",
    summary="BD3-LM block diffusion: blocks left to right, diffusion inside a block",
    mask=masks.block_causal_mask,
    streams=lambda model_cfg: 2,
    objective=_masked_diffusion(BlockDiffusionObjective),
    samplers=("block",),
    kv_cache=True,
    masking=_DENSITY,
    elbo_variance=_continuous_elbo_variance,
))
register_variant(VariantSpec(
    name="jigsaw",
    summary="seed 000's Jigsaw (BAD-AR): blocks in any order, left to right inside a block",
    mask=masks.block_diagonal_causal_mask,
    streams=lambda model_cfg: model_cfg.jigsaw_streams,
    objective=lambda cfg, mask_id, model_cfg: JigsawObjective(
        **diffusion_kwargs(cfg, mask_id), streams=getattr(model_cfg, "jigsaw_streams", 1)),
    samplers=("jigsaw",),
    elbo_variance=_jigsaw_elbo_variance,
))
register_variant(_trained_as_mdm(
    "scatter", "seed 000's Scatter (BOP-AR): offset by offset, all blocks at once", masks.offset_causal_mask,
    ("scatter",),
    refusal=("Scatter's denoiser at offset o attends only to offsets <= o (and the prompt), so a sampler "
             "that may reveal a position before its lower offsets ignores tokens already committed at "
             "higher offsets and does not sample the model's factorisation; Scatter decodes offset by offset "
             "(sampler scatter)"),
    masking=_DENSITY,
))


# --------------------------------------------------------------------------------------------
# What the trainer, the evaluator and the samplers ask of the table
# --------------------------------------------------------------------------------------------


class _JigsawStreams:
    def __init__(self, jigsaw_streams: int):
        self.jigsaw_streams = jigsaw_streams


def build_objective(cfg: DiffusionConfig, variant: str, mask_id: int, jigsaw_streams: int = 1) -> Objective:
    """The objective of a model variant (its registry entry), with the configured masking policy,
    refused when the variant does not train with it. Block sizes are read from the model."""
    if variant not in VARIANTS:
        raise ValueError(f"no objective for model variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    if cfg.masking not in spec.masking:
        users = [v for v, s in VARIANTS.items() if cfg.masking in s.masking]
        raise ValueError(f"diffusion.masking={cfg.masking} needs model.variant={' or '.join(users)} "
                         f"(got {variant!r})")
    return spec.objective(cfg, mask_id, _JigsawStreams(jigsaw_streams))


def objective_for(cfg: Config, mask_id: int) -> Objective:
    """build_objective for a whole run config."""
    return build_objective(cfg.diffusion, cfg.model.variant, mask_id, jigsaw_streams=cfg.model.jigsaw_streams)


def samplers() -> tuple[str, ...]:
    """Every decoding sampler some variant declares, in table order."""
    return tuple(dict.fromkeys(s for spec in VARIANTS.values() for s in spec.samplers))


def resolve_sampler(variant: str, name: str) -> str:
    """`name` (`auto` = the variant's own), refused with the variant's reason when it does not fit."""
    spec = variant_spec(variant)
    name = (spec.default_sampler or spec.samplers[0]) if name == "auto" else name
    known = samplers()
    if name not in known:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(('auto', *known))}")
    if name not in spec.samplers:
        why = f" ({spec.refusal})" if spec.refusal else ""
        raise ValueError(f"sampler {name!r} does not fit a {variant!r} model{why}; use one of "
                         f"{', '.join(spec.samplers)}")
    return name


def variant_problems(cfg: Config) -> list[str]:
    """The config problems the variant's entry finds: masking policy, density, its own constraints.
    Called by config.validate once the plain choices are valid."""
    m, f, d = cfg.model, cfg.diffusion, cfg.data
    spec = VARIANTS[m.variant]
    problems: list[str] = []
    if f.masking not in spec.masking:
        users = [v for v, s in VARIANTS.items() if f.masking in s.masking]
        problems.append(f"`diffusion.masking` = {f.masking!r}: {f.masking} works with model.variant "
                        f"{', '.join(users)} only (not {m.variant})")
    if MASKING_POLICIES[f.masking].needs_density:
        if getattr(getattr(d, "density", None), "annotator", "none") == "none":
            problems.append(f"`diffusion.masking` = {f.masking!r}: needs per-token density: set "
                            "data.density.annotator (unigram, tfidf, structure or model)")
    return problems + spec.constraints(cfg)


def elbo_weight_problems(cfg: Config) -> list[str]:
    """`elbo` importance-weights each draw by w(t)/q(t); with a bell q that vanishes where w does not
    (near eps or t = 1) the weights reach ~6e10 (logit-normal(0, 1), eps 1e-3) and their variance
    is infinite or far above uniform t's (time_samplers.elbo_variance_ratio). Refused above
    ELBO_VARIANCE_LIMIT x uniform's, naming what to change; how the variance is measured is the
    variant's (`elbo_variance`), which samplers need the check the sampler registry's."""
    f = cfg.diffusion
    spec = VARIANTS[cfg.model.variant]
    if f.weighting != "elbo" or not TIME_SAMPLERS[f.time_sampler].check_elbo_variance or spec.elbo_variance is None:
        return []
    schedule = build_schedule(f.schedule)
    sampler = build_time_sampler(f.time_sampler, f.eps, t_min=f.t_min, t_max=f.t_max, options=f)
    ratio, where = spec.elbo_variance(cfg, schedule, sampler)
    if ratio <= ELBO_VARIANCE_LIMIT:
        return []
    if f.time_sampler == "bell":
        shape = (f"logit_normal(mu {f.bell.mu}, sigma {f.bell.sigma})" if f.bell.family == "logit_normal"
                 else f"beta(a {f.bell.a}, b {f.bell.b})")
        what, fix = "the bell", ("diffusion.bell.family=beta with diffusion.bell.b < 2 (a larger diffusion.eps "
                                 "also helps), or diffusion.time_sampler=uniform or antithetic")
    else:
        shape, what, fix = f.time_sampler, "the sampler", "diffusion.time_sampler=uniform or antithetic"
    size = "infinite" if math.isinf(ratio) else f"{ratio:.3g}x uniform t's"
    return [f"`diffusion.weighting` = 'elbo' with diffusion.time_sampler = {f.time_sampler} ({shape}, diffusion.eps "
            f"{f.eps}, schedule {f.schedule}): the variance of the importance weights ({where}) is {size} "
            f"(limit {ELBO_VARIANCE_LIMIT:g}x): {what} has almost no mass where the NELBO's weight does. "
            f"Use diffusion.weighting=reweighted ({what} reshapes training; validation stays the unbiased "
            f"uniform-t NELBO), or {fix}"]
