"""Typed run configuration: dataclasses, YAML with `inherit:`, dotted overrides, up-front validation.

One `Config` object is built once by `load_config` and passed down everywhere (torchtitan style).
The mechanics are OmegaConf structured configs (dataclass schema, type checking on merge, dotted
overrides); this module adds what OmegaConf does not: `inherit:` chains between files, error
messages that name the file, the key and the closest valid key, and range/choice checks.

    cfg = load_config("configs/lm1b_bell.yaml", ["train.lr=3e-4", "model.n_layers=4"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.config_file import ConfigError, merge_layers, read_layers
from data_pipeline.config import DataConfig, SudokuTaskConfig, TaskConfig  # noqa: F401  (re-exported)
from pretrain.diffusion.masking import DENSITY_FORMS, MASKING_POLICIES, SYNTACTIC_FORMS
from pretrain.diffusion.objective import PARAMETERIZATIONS, WEIGHTINGS
from pretrain.diffusion.schedules import SCHEDULES
from pretrain.diffusion.time_samplers import BELL_FAMILIES, TIME_SAMPLERS, BellConfig
from pretrain.model.transformer import swiglu_hidden
from pretrain.variants import VARIANTS, elbo_weight_problems, variant_problems

# --------------------------------------------------------------------------------------------
# Schema. Defaults are the embedded quickstart's scale; recipes in configs/ override them.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # ar (causal, next token) | mdm (bidirectional masked diffusion) | block (BD3-LM block diffusion)
    # | jigsaw, scatter (seed 000's locality-aware blockwise models); the table is pretrain/variants.py
    variant: str = "mdm"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    mlp: str = "swiglu"  # swiglu | gelu
    mlp_ratio: float = 4.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    # Dropout as MDLM's DiT has it: on the attention and MLP outputs before the residual add. The
    # attention probabilities and the embeddings get none by default (MDLM's flash kernel runs with
    # dropout_p 0): a kernel without dropout is what lets padded batches take FlexAttention on a GPU.
    dropout: float = 0.0
    attention_dropout: float = 0.0  # on the attention probabilities (Megatron's attention_dropout)
    embedding_dropout: float = 0.0  # on the token embeddings (GPT-2's embd_pdrop)
    time_conditioning: bool = False  # adaLN on t as in MDLM's DiT (log-linear MDLM does not need it)
    cond_dim: int = 128  # width of the time embedding when time_conditioning is on
    block_size: int = 0  # tokens per block for blockwise variants; 0 = the whole sequence
    # jigsaw: 1 = the authors' single-stream BAD-AR (a masked block holds only mask tokens, causal
    # among themselves); 2 = ours, a teacher-forced two-stream [x_t | x_0] pass (blockwise.py)
    jigsaw_streams: int = 1
    tie_embeddings: bool = False  # MDLM unties input and output embeddings
    vocab_size: int = 0  # 0 = taken from the tokenizer; otherwise must match it


@dataclass
@dataclass
class AdaptiveConfig:
    """diffusion.time_sampler=adaptive: q learned online from the per-t-bucket loss (ours, no anchor paper
    has one; pretrain/diffusion/adaptive_time.py). Defaults are our choice, not a paper's."""

    buckets: int = 10  # K: q is piecewise constant over K equal buckets of [max(eps, t_min), t_max]
    floor: float = 0.2  # each bucket keeps >= floor / K of the mass (importance weights <= 1 / floor; 1 = uniform)
    decay: float = 0.9  # EMA decay of the bucket statistics, per update
    warmup_steps: int = 100  # q is uniform before this optimizer step (statistics are gathered meanwhile)
    update_every: int = 10  # optimizer steps between updates of q (statistics are summed every step)
    # what q_k follows: rms (minimum variance of iid draws) | std (Neyman: minimum variance of stratified
    # draws) | auto (std with diffusion.stratified, rms without)
    statistic: str = "auto"


@dataclass
class DiffusionConfig:
    schedule: str = "loglinear"  # linear | loglinear | cosine: alpha_t, the unmasked probability
    eps: float = 1e-3  # t is drawn from [eps, 1] (MDLM's sampling_eps)
    # training t restricted to [max(eps, t_min), t_max], the sampler truncated and renormalised (seed 002
    # trains at noise ratio [0.3, 0.8]; under `linear` t is the masking rate). The training NELBO is then
    # over that range only; validation NLL stays the full [eps, 1] NELBO (time_samplers.py)
    t_min: float = 0.0
    t_max: float = 1.0
    time_sampler: str = "uniform"  # uniform | antithetic | bell | adaptive (registry: pretrain/diffusion/time_samplers.py)
    # draw t by the inverse CDF of uniforms stratified over the global batch (MDLM's "antithetic"
    # sampling, for any density; `antithetic` = uniform + stratified); marginals unchanged
    stratified: bool = False
    weighting: str = "elbo"  # elbo: importance-weighted, unbiased NELBO | reweighted: the sampler's surrogate
    # subs: MDLM's SUBS parameterisation (the denoiser never predicts [MASK]: its logit is dropped
    # from the cross-entropy; unmasked tokens are carried over) | plain: softmax over the full
    # vocabulary, [MASK] included (this framework before SUBS). Masked-diffusion variants only.
    parameterization: str = "subs"
    bell: BellConfig = field(default_factory=BellConfig)  # defined next to the bell sampler (time_samplers.py)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)  # time_sampler=adaptive only
    # which tokens get masked at a given t: uniform | density_priority | complementary (seed 002;
    # the last two read the shards' density column: set data.density.annotator; see masking.py)
    # | reverse_order (seed 003, mdm: blocks of model.block_size masked last-first; reverse_order.py)
    masking: str = "uniform"
    # how density_priority/complementary tilt toward dense tokens (masking.py): ratio (dense tokens
    # density_ratio times as likely to be masked, the rate kept: the paper's form) | logit_tilt (ours)
    density_form: str = "ratio"
    density_ratio: float = 2.0  # w of the ratio form: the paper's best is 2 (1 = uniform masking)
    density_threshold: float = 0.5  # ratio form: dense = density >= this (with data view hubs: the hub flag)
    # logit_tilt form: logit tilt per unit of density (0 = uniform; odds ratio e^s densest vs sparsest)
    density_strength: float = 3.0
    # complementary's syntactic sample: priority (its own mask at rate 1 - r, dense tokens kept: ratio
    # syntactic_ratio, or strength -s) | complement (exactly the tokens the logical sample leaves)
    syntactic: str = "priority"
    syntactic_ratio: float = 0.5  # w of the syntactic sample (the paper's 0.5, as its summaries give it)
    eval_t_samples: int = 8  # t draws per validation sequence (fixed seed: deterministic)
    loss_buckets: int = 10  # training loss is also logged per t bucket


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32  # global batch, in sequences (all data-parallel ranks and micro-batches together)
    micro_batch_size: int = 0  # sequences per rank per forward; 0 = batch_size / dp (no accumulation)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0  # MDLM uses none
    warmup_steps: int = 20
    lr_schedule: str = "constant"  # constant (after warmup, MDLM) | cosine | linear
    min_lr_ratio: float = 0.1  # floor of cosine/linear decay, as a fraction of lr
    grad_clip: float = 1.0  # 0 = off
    # adamw (betas, weight_decay above) | sgd: plain SGD without momentum, whose update is the gradient
    # itself, so any error in gradient scale shows in the weights (the layout tests use it)
    optimizer: str = "adamw"
    eval_every: int = 100  # steps between validation passes (also run at step 0 and at the end)
    eval_batches: int = 8  # validation batches (of train.batch_size sequences) per pass; 0 = the whole split
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    # a NaN/inf loss or gradient (any micro-batch, any rank) skips the optimizer step on every rank;
    # this many skipped steps in a row stop the run (its last checkpoint holds the last good weights)
    max_nonfinite_steps: int = 5
    ema: float = 0.0  # decay of a moving average of the weights used for validation and export (MDLM 0.9999); 0 = off
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    peak_tflops: float = 0.0  # one device's peak TFLOP/s for MFU; 0 = from pretrain/throughput.py's table
    dtype: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | fp32 | bf16
    # torch.compile the model (inductor: C++ on CPU, Triton on GPU): fused kernels, the same maths.
    # The first steps pay the compilation (tens of seconds on CPU); bench/bench_compile.py measures it.
    compile: bool = False
    # recompute transformer blocks' activations in the backward pass instead of holding them
    # (parallel/activation_checkpointing.py): none | all (every block) | every_k (blocks 0, k, 2k, ...)
    activation_checkpointing: str = "none"
    activation_checkpointing_k: int = 2  # with every_k: checkpoint every k-th block (k >= 1; 1 = all)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (0 with several ranks = plain data parallelism)
    timeout_s: float = 600.0  # a collective waiting longer than this fails the job (a dead rank, a hang)


# `launch.slurm`: what a Slurm job asks for. A plain dataclass (no submitit import), here because the run's
# Config carries it and slurm/ (the layer above) reads it. Tasks per node are `launch.nproc`, nodes
# `launch.nodes`; empty strings mean "leave it to the cluster's default".
@dataclass
class SlurmConfig:
    partition: str = ""  # sbatch --partition ("" = the cluster's default partition)
    account: str = ""  # sbatch --account
    qos: str = ""  # sbatch --qos
    time_min: int = 60  # time limit per job (a requeued job gets the same again), minutes
    cpus_per_task: int = 4  # CPUs per rank (data loader workers, tokenizing)
    mem_gb: int = 0  # memory per node in GB; 0 = the partition's default
    gpus_per_node: int = -1  # -1 = launch.nproc when train.device is cuda, else 0
    constraint: str = ""  # sbatch --constraint, e.g. "a100|h100"
    exclusive: bool = False  # sbatch --exclusive (whole nodes)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job, e.g. "module load cuda/12.4"
    signal_delay_s: int = 120  # Slurm sends USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # requeues after preemption or time limit before the job gives up (resubmit to go on)
    folder: str = ""  # submitit's logs and pickles; "" = <run dir>/slurm
    snapshot: bool = True  # run from a copy of the code taken at submit time (<run dir>/code/<stamp>)
    array_parallelism: int = 64  # data builds: array tasks running at once


def slurm_problems(s: SlurmConfig, nodes: int) -> list[str]:
    """Range checks for `launch.slurm` and `launch.nodes`, as `config.validate` phrases them."""
    out = []

    def need(ok: bool, key: str, value: object, allowed: str) -> None:
        if not ok:
            out.append(f"`{key}` = {value!r}: {allowed}")

    need(nodes >= 1, "launch.nodes", nodes, "must be >= 1")
    need(s.time_min >= 1, "launch.slurm.time_min", s.time_min, "must be >= 1 (minutes)")
    need(s.cpus_per_task >= 1, "launch.slurm.cpus_per_task", s.cpus_per_task, "must be >= 1")
    need(s.mem_gb >= 0, "launch.slurm.mem_gb", s.mem_gb, "must be >= 0 (0 = the partition's default)")
    need(s.gpus_per_node >= -1, "launch.slurm.gpus_per_node", s.gpus_per_node,
         "must be >= 0, or -1 (= launch.nproc when train.device is cuda)")
    need(0 <= s.signal_delay_s < s.time_min * 60, "launch.slurm.signal_delay_s", s.signal_delay_s,
         f"must be in [0, time limit = {s.time_min * 60} s)")
    need(s.max_requeues >= 0, "launch.slurm.max_requeues", s.max_requeues, "must be >= 0")
    need(s.array_parallelism >= 1, "launch.slurm.array_parallelism", s.array_parallelism, "must be >= 1")
    for line in s.setup:
        need("\n" not in line, "launch.slurm.setup", line, "one shell line per entry")
    return out


@dataclass
class LaunchConfig:
    # local: processes on this machine | slurm: a Slurm job through submitit (README "Running on Slurm")
    # | auto: slurm when sbatch is on the PATH, Slurm answers and the job needs more than this machine has
    backend: str = "local"
    nproc: int = 1  # processes (ranks) per node: on this machine, or Slurm tasks per node (= GPUs per node)
    nodes: int = 1  # Slurm nodes (more than 1 needs the slurm backend)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # partition, time limit, requeues, ...
    output_dir: str = "runs"  # runs land in <output_dir>/<experiment>/<run_name>
    run_name: str = ""  # "" = <config name>-s<seed>-<keys set away from the recipe>-<short hash of the config>
    resume: bool = True  # continue from the run directory's latest checkpoint if there is one


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlruns.db"  # local sqlite store, or http://host:port of a tracking server
    artifact_location: str = "mlruns"  # artifact folder for a new experiment in a local store
    experiment: str = "dlm-pretrain"
    log_samples: int = 3  # generations (task prompts) decoded and logged as text (0 = off)
    # the finished run's model as an MLflow artifact: "hf" = its Hugging Face export (pretrain.convert --hf:
    # safetensors, config, tokenizer, modeling code; needs the hf extra) under the run's `model/`
    log_model: str = "none"
    samples_every: int = 0  # steps between those decodings, at an evaluation; 0 = only the final one
    # seconds between batched sends: each send is a database transaction (sqlite) or an HTTP call whose
    # Python work competes with the training step for the CPU; metrics arrive at most this late
    flush_interval_s: float = 10.0


@dataclass
class Config:
    name: str = ""  # recipe name, prefix of the run name; "" = the config file's name
    seed: int = 0  # training seed: init, data order, diffusion draws
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Keys whose value must be one of a fixed set. Kept next to the schema so `--help`-style messages
# and validation agree. Where a registry defines the set (variants, time samplers, schedules, masking
# policies), the allowed values are its keys, read when a config is validated: registering an entry
# makes the config accept it.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.packing": ("pad", "wrap"),
    "data.train_on": ("auto", "all", "response"),
    "model.mlp": ("swiglu", "gelu"),
    "model.norm": ("rmsnorm", "layernorm"),
    "diffusion.weighting": WEIGHTINGS,
    "diffusion.parameterization": PARAMETERIZATIONS,
    "diffusion.density_form": DENSITY_FORMS,
    "diffusion.syntactic": SYNTACTIC_FORMS,
    "diffusion.adaptive.statistic": ("auto", "rms", "std"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "tracking.log_model": ("none", "hf"),
    "train.optimizer": ("adamw", "sgd"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "train.activation_checkpointing": ("none", "all", "every_k"),
    "launch.backend": ("auto", "local", "slurm"),
}
REGISTRIES: dict[str, dict] = {
    "model.variant": VARIANTS,
    "diffusion.schedule": SCHEDULES,
    "diffusion.time_sampler": TIME_SAMPLERS,
    "diffusion.bell.family": BELL_FAMILIES,
    "diffusion.masking": MASKING_POLICIES,
}


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed set of allowed values: CHOICES plus the registries' current keys."""
    return {**CHOICES, **{key: tuple(registry) for key, registry in REGISTRIES.items()}}


# --------------------------------------------------------------------------------------------
# Loading (the mechanics are shared with the shard builder: common/config_file.py)
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load `path` (with its `inherit:` chain) over the defaults, apply dotted overrides, validate."""
    cfg: Config = merge_layers(Config, read_layers(path, overrides))
    if not cfg.name:
        cfg.name = Path(path).stem if path is not None else "run"
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation: ranges and combinations, checked before anything runs
# --------------------------------------------------------------------------------------------


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    """Raise ConfigError listing every problem found (not just the first)."""
    problems: list[str] = []

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            problems.append(f"`{key}` = {_get(cfg, key)!r}: {allowed}")

    allowed_values = choices()
    for key, allowed in allowed_values.items():
        need(_get(cfg, key) in allowed, key, f"must be one of {', '.join(allowed)}")

    d, m, f, t, p, lc = cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.parallel, cfg.launch
    need(bool(d.source.strip()), "data.source", "must name a source (task:NAME, hf:NAME or a local path)")
    need(d.seq_len >= 2, "data.seq_len", "must be >= 2")
    if d.train_on == "response" or (d.train_on == "auto" and d.source.startswith("task:")):
        need(d.packing == "pad", "data.train_on",
             "response training needs data.packing=pad (one `[BOS] prompt answer [EOS]` document per row)")
        need(d.source.startswith("task:") or bool(d.prompt_separator), "data.prompt_separator",
             "data.train_on=response on a non-task source needs the token that ends a prompt")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    need(d.vocab_size >= 16, "data.vocab_size", "must be >= 16")
    need(d.shard_size_mb > 0, "data.shard_size_mb", "must be > 0")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    need(d.task.num_train >= 1, "data.task.num_train", "must be >= 1")
    need(d.task.num_val >= 1, "data.task.num_val", "must be >= 1")
    need(17 <= d.task.sudoku.givens <= 81, "data.task.sudoku.givens", "must be in [17, 81]")

    for key in ("model.n_layers", "model.d_model", "model.n_heads", "model.cond_dim"):
        need(_get(cfg, key) >= 1, key, "must be >= 1")
    need(m.d_model % max(m.n_heads, 1) == 0, "model.d_model", f"must be divisible by model.n_heads = {m.n_heads}")
    need((m.d_model // max(m.n_heads, 1)) % 2 == 0, "model.d_model",
         "d_model / n_heads (the head size) must be even for rotary embeddings")
    need(m.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")
    for key in ("dropout", "attention_dropout", "embedding_dropout"):
        need(0.0 <= getattr(m, key) < 1.0, f"model.{key}", "must be in [0, 1)")
    need(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
    need(m.block_size >= 0, "model.block_size", "must be >= 0 (0 = the whole sequence)")
    need(m.jigsaw_streams in (1, 2), "model.jigsaw_streams",
         "must be 1 (the authors' single-stream Jigsaw) or 2 (ours: teacher-forced two-stream)")
    if m.block_size > 0:
        need(d.seq_len % m.block_size == 0, "model.block_size",
             f"must divide data.seq_len = {d.seq_len} (allowed: {_divisors(d.seq_len)})")

    need(0.0 <= f.eps < 0.5, "diffusion.eps", "must be in [0, 0.5)")
    need(f.bell.sigma > 0, "diffusion.bell.sigma", "must be > 0")
    need(f.bell.a > 0, "diffusion.bell.a", "must be > 0")
    need(f.bell.b > 0, "diffusion.bell.b", "must be > 0")
    need(f.eval_t_samples >= 1, "diffusion.eval_t_samples", "must be >= 1")
    if not problems:  # the variant's measure of `elbo`'s weight variance (pretrain/variants.py)
        problems.extend(elbo_weight_problems(cfg))
    need(f.loss_buckets >= 1, "diffusion.loss_buckets", "must be >= 1")
    if f.time_sampler == "adaptive":  # pretrain/diffusion/adaptive_time.py
        a = f.adaptive
        need(a.buckets >= 1, "diffusion.adaptive.buckets", "must be >= 1")
        need(0.0 < a.floor <= 1.0, "diffusion.adaptive.floor",
             "must be in (0, 1]: every bucket keeps >= floor / buckets of the mass (1 = uniform t)")
        need(0.0 <= a.decay < 1.0, "diffusion.adaptive.decay", "must be in [0, 1)")
        need(a.warmup_steps >= 0, "diffusion.adaptive.warmup_steps", "must be >= 0")
        need(a.update_every >= 1, "diffusion.adaptive.update_every", "must be >= 1")
        need(m.variant in ("mdm", "scatter"), "diffusion.time_sampler",
             f"adaptive works with model.variant mdm or scatter (one t per sequence), not {m.variant}")
        need(f.masking in ("uniform", "density_priority"), "diffusion.time_sampler",
             f"adaptive works with diffusion.masking uniform or density_priority, not {f.masking}")
        need(p.pp == 1, "diffusion.time_sampler",
             "adaptive needs parallel.pp = 1: only the last pipeline stage sees the loss it learns from")
    need(f.density_strength >= 0, "diffusion.density_strength", "must be >= 0 (0 = uniform masking)")
    need(f.density_ratio > 0, "diffusion.density_ratio", "must be > 0 (1 = uniform masking; the paper's best is 2)")
    need(f.syntactic_ratio > 0, "diffusion.syntactic_ratio", "must be > 0 (the paper's 0.5)")
    need(0.0 < f.density_threshold <= 1.0, "diffusion.density_threshold",
         "must be in (0, 1]: tokens with density >= it are the dense ones")
    need(0.0 <= f.t_min < 1.0, "diffusion.t_min", "must be in [0, 1)")
    need(0.0 < f.t_max <= 1.0, "diffusion.t_max", "must be in (0, 1]")
    need(max(f.eps, f.t_min) < f.t_max, "diffusion.t_max",
         f"must exceed max(diffusion.eps, diffusion.t_min) = {max(f.eps, f.t_min)} (t is drawn from between them)")
    if all(_get(cfg, key) in allowed_values[key] for key in REGISTRIES):
        problems.extend(variant_problems(cfg))  # masking policy, density, the variant's own constraints

    need(t.steps >= 1, "train.steps", "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be > 0 (a learning rate; MDLM uses 3e-4)")
    need(0.0 <= t.beta1 < 1.0, "train.beta1", "must be in [0, 1)")
    need(0.0 <= t.beta2 < 1.0, "train.beta2", "must be in [0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
    for key in ("train.eval_every", "train.log_every"):
        need(_get(cfg, key) >= 1, key, "must be >= 1")
    for key in ("train.eval_batches", "train.checkpoint_every"):
        need(_get(cfg, key) >= 0, key, "must be >= 0")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(cfg.tracking.flush_interval_s > 0, "tracking.flush_interval_s", "must be > 0")
    need(cfg.tracking.log_samples >= 0, "tracking.log_samples", "must be >= 0 (0 = off)")
    need(cfg.tracking.samples_every >= 0 and cfg.tracking.samples_every % max(t.eval_every, 1) == 0,
         "tracking.samples_every", f"must be 0 (only at the end) or a multiple of train.eval_every "
         f"({t.eval_every}): samples are decoded at an evaluation")
    need(t.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0 = the device's from the table)")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(not t.compile or (p.tp == 1 and p.pp == 1), "train.compile",
         "works with parallel.tp=1 and parallel.pp=1 only (the tensor- and pipeline-parallel wrappers are not compiled)")
    need(t.activation_checkpointing_k >= 1, "train.activation_checkpointing_k",
         f"must be >= 1 (checkpoint every k-th of the model.n_layers = {m.n_layers} blocks; 1 = all)")
    need(0.0 <= t.ema < 1.0, "train.ema", "must be in [0, 1) (0 = off; MDLM uses 0.9999)")
    need(t.ema == 0.0 or p.zero_stage != 3, "train.ema",
         "must be 0 with parallel.zero_stage=3: ZeRO-3 partitions the weights the average is taken of")

    need(p.tp >= 1, "parallel.tp", "must be >= 1")
    need(p.pp >= 1, "parallel.pp", "must be >= 1")
    if p.tp > 1:  # what parallel/tensor_parallel.py shards, refused here rather than in every rank at start-up
        heads_ok = [k for k in range(1, m.n_heads + 1) if m.n_heads % k == 0]
        need(m.n_heads % p.tp == 0, "parallel.tp",
             f"must divide model.n_heads = {m.n_heads} (attention is split by whole heads; allowed: "
             f"{', '.join(map(str, heads_ok))})")
        hidden = _mlp_hidden(m)
        need(hidden % p.tp == 0, "parallel.tp",
             f"must divide the MLP hidden size {hidden} (model.mlp = {m.mlp}, mlp_ratio = {m.mlp_ratio}, "
             f"d_model = {m.d_model}): its columns are split over the tensor-parallel ranks")
        # the vocabulary needs no divisibility: it is padded to a multiple of tp (tensor_parallel.py)
    if p.pp > 1:  # DeepSpeed's pipeline engine (parallel/pipeline.py) and what it does not combine with
        need(p.zero_stage <= 1, "parallel.zero_stage",
             "must be 0 or 1 with parallel.pp > 1: DeepSpeed's pipeline engine does not combine with ZeRO-2/3")
        need(cfg.model.n_layers >= p.pp, "parallel.pp",
             f"must be <= model.n_layers = {cfg.model.n_layers}: every stage needs a transformer block")
        need(not cfg.model.tie_embeddings, "model.tie_embeddings",
             "must be false with parallel.pp > 1: the embedding and the head sit on different stages")
    need(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3 (DeepSpeed ZeRO stages)")
    need(p.timeout_s > 0, "parallel.timeout_s", "must be > 0")
    need(lc.nproc >= 1, "launch.nproc", "must be >= 1")
    problems.extend(slurm_problems(lc.slurm, lc.nodes))
    need(lc.nodes == 1 or lc.backend != "local", "launch.nodes",
         "more than 1 node needs launch.backend=slurm (or auto)")
    model_parallel = max(p.tp, 1) * max(p.pp, 1)
    need(lc.nproc % model_parallel == 0, "launch.nproc",
         f"must be a multiple of parallel.tp x parallel.pp = {model_parallel}")
    dp = max(lc.nproc * max(lc.nodes, 1) // model_parallel, 1)  # ranks on all nodes
    micro = t.micro_batch_size or (t.batch_size // dp if t.batch_size % dp == 0 else 0)
    need(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0 (0 = batch_size / data-parallel size)")
    need(micro > 0 and t.batch_size % (micro * dp) == 0, "train.batch_size",
         f"must be a multiple of micro_batch_size x data-parallel size = {t.micro_batch_size or '?'} x {dp}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _mlp_hidden(m: ModelConfig) -> int:
    """The MLP's hidden width, as the model computes it (pretrain/model/transformer.py)."""
    return swiglu_hidden(m.d_model, m.mlp_ratio) if m.mlp == "swiglu" else int(m.mlp_ratio * m.d_model)


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted key -> value for every leaf (MLflow params, run comparison)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


# How long a run lasts and how often it reports, not what it computes: left out of the run name's
# hash, so `--set train.steps=...` larger extends the same run (launch resumes it and says so).
RUN_LENGTH_KEYS = ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "train.max_nonfinite_steps")
# How fast a run computes, not what: also left out of the hash, so a compiled run resumes an eager one.
SPEED_KEYS = ("train.compile",)


def config_hash(cfg: Config, length: int = 8) -> str:
    """Short stable hash of what the run computes (launch/tracking settings, RUN_LENGTH_KEYS and SPEED_KEYS
    excluded)."""
    d = to_dict(cfg)
    for section in ("launch", "tracking"):
        d.pop(section)
    for key in RUN_LENGTH_KEYS + SPEED_KEYS:
        section, name = key.split(".")
        d[section].pop(name)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def recipe_defaults(path: str | Path | None) -> Config:
    """The recipe `path` as written (its `inherit:` chain, no overrides, not validated): what a run's
    overrides are measured against when naming it."""
    cfg: Config = merge_layers(Config, read_layers(path, None))
    if not cfg.name:
        cfg.name = Path(path).stem if path is not None else "run"
    return cfg


def descriptive_run_name(cfg: Config, recipe: Config | None = None, max_changes: int = 48) -> str:
    """`<recipe>-s<seed>[-<key>=<value>,...]-<hash>`: the recipe, the seed and the keys set away from the
    recipe (those the hash covers: not launch/tracking or RUN_LENGTH_KEYS, so extending a run keeps its
    name), shortened to their last part; more than `max_changes` characters of them become `<n>changes`.
    The hash keeps two runs with different settings apart whatever the text shows."""
    parts = [cfg.name, f"s{cfg.seed}"]
    if recipe is not None:
        now, was = flatten(cfg), flatten(recipe)
        changed = [k for k in sorted(now) if now[k] != was.get(k) and k not in ("seed", "name", *RUN_LENGTH_KEYS)
                   and not k.startswith(("launch.", "tracking."))]
        text = ",".join(f"{k.rsplit('.', 1)[-1]}={now[k]}" for k in changed)
        if text:
            parts.append(text if len(text) <= max_changes else f"{len(changed)}changes")
    parts.append(config_hash(cfg))
    return re.sub(r"[^A-Za-z0-9._=,+-]", "", "-".join(parts))  # a directory name, whatever the values
