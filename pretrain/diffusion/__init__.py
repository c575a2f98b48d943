"""The diffusion objective: schedules, time samplers, masking policies, per-step RNG, losses.

Importing the package imports every module that registers a time sampler, schedule or masking
policy (the config's allowed values are the registries' keys): a module adding one is imported here.
Which objective a model variant trains with is pretrain/variants.py's `build_objective`.
"""

from pretrain.diffusion import (
    adaptive_time,  # noqa: F401  (registers the adaptive time sampler)
    reverse_order,  # noqa: F401  (registers the reverse_order masking policy)
)
from pretrain.diffusion.blockwise import BlockDiffusionObjective, JigsawObjective
from pretrain.diffusion.masking import (
    MASKING_POLICIES,
    MaskingSpec,
    UniformMasking,
    build_masking,
    register_masking,
)
from pretrain.diffusion.objective import (
    AutoregressiveObjective,
    LossStats,
    MaskedDiffusionObjective,
    Objective,
)
from pretrain.diffusion.rng import StepRNG, step_rng
from pretrain.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    Schedule,
    build_schedule,
)
from pretrain.diffusion.time_samplers import (
    TIME_SAMPLERS,
    AntitheticSampler,
    BellConfig,
    BetaBellSampler,
    LogitNormalBellSampler,
    TimeSampler,
    UniformSampler,
    build_time_sampler,
    register_time_sampler,
)

__all__ = [
    "MASKING_POLICIES",
    "SCHEDULES",
    "TIME_SAMPLERS",
    "AntitheticSampler",
    "AutoregressiveObjective",
    "BellConfig",
    "BetaBellSampler",
    "BlockDiffusionObjective",
    "CosineSchedule",
    "JigsawObjective",
    "LinearSchedule",
    "LogLinearSchedule",
    "LogitNormalBellSampler",
    "LossStats",
    "MaskedDiffusionObjective",
    "MaskingSpec",
    "Objective",
    "Schedule",
    "StepRNG",
    "TimeSampler",
    "UniformMasking",
    "UniformSampler",
    "build_masking",
    "build_schedule",
    "build_time_sampler",
    "register_masking",
    "register_time_sampler",
    "step_rng",
]
