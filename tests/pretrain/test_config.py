"""Config loading, inheritance, overrides and every kind of validation error."""

from pathlib import Path

import pytest

from pretrain.config import ConfigError, flatten, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_recipes_load_and_lm1b_pair_differs_only_in_sampler():
    """Seed 001's pair: MDLM's standard recipe (stratified t, EMA 0.9999, SUBS) and the same with
    the bell density; the flattened configs differ in the time sampler alone (and the name)."""
    bell = load_config(CONFIGS / "lm1b_bell.yaml")
    uniform = load_config(CONFIGS / "lm1b_uniform.yaml")
    load_config(CONFIGS / "quickstart.yaml")
    a, b = flatten(bell), flatten(uniform)
    assert a.keys() == b.keys()
    differing = {k for k in a if a[k] != b[k]}
    assert differing == {"name", "diffusion.time_sampler"}  # name comes from the file name
    assert (bell.diffusion.time_sampler, uniform.diffusion.time_sampler) == ("bell", "uniform")
    for cfg in (bell, uniform):  # MDLM's baseline recipe, in both
        assert cfg.diffusion.stratified and cfg.train.ema == 0.9999
        assert cfg.diffusion.parameterization == "subs" and cfg.diffusion.schedule == "loglinear"
        assert (cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_steps) == (3e-4, 512, 2500)
    assert bell.data.source == "hf:lm1b" and bell.data.packing == "pad" and bell.data.seq_len == 128


def test_repro_pair_differs_only_in_sampler_and_keeps_its_recorded_settings():
    bell = load_config(CONFIGS / "repro" / "text_bell.yaml")
    uniform = load_config(CONFIGS / "repro" / "text_uniform.yaml")
    a, b = flatten(bell), flatten(uniform)
    assert {k for k in a if a[k] != b[k]} == {"name", "diffusion.time_sampler"}
    # the settings bench/RESULTS.md's runs were recorded with (text_bell.yaml says why)
    assert (bell.diffusion.stratified, bell.diffusion.parameterization, bell.train.ema) == (False, "plain", 0.0)


def test_char_pair_is_mdlm_baseline_and_differs_only_in_sampler():
    bell = load_config(CONFIGS / "repro" / "char_bell.yaml")
    uniform = load_config(CONFIGS / "repro" / "char_uniform.yaml")
    ar = load_config(CONFIGS / "repro" / "char_ar.yaml")
    a, b = flatten(bell), flatten(uniform)
    assert {k for k in a if a[k] != b[k]} == {"name", "diffusion.time_sampler"}
    assert {k for k, v in flatten(ar).items() if a[k] != v} == {"name", "model.variant"}
    # issue 22: MDLM's baseline (stratified t, EMA, SUBS) on character-level text, one token budget
    assert (bell.diffusion.stratified, bell.diffusion.parameterization) == (True, "subs") and bell.train.ema > 0
    assert bell.data.tokenizer == "char" and not bell.train.compile
    assert bell.train.steps * bell.train.batch_size * bell.data.seq_len >= 20e6


def test_inherit_chain_child_overrides_parent(tmp_path):
    write(tmp_path, "base.yaml", "train:\n  lr: 0.01\n  steps: 7\nmodel:\n  n_layers: 3\n")
    write(tmp_path, "mid.yaml", "inherit: base.yaml\ntrain:\n  steps: 9\n")
    child = write(tmp_path, "child.yaml", "inherit: [mid.yaml]\nmodel:\n  d_model: 64\n")
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.steps, cfg.model.n_layers, cfg.model.d_model) == (0.01, 9, 3, 64)
    assert cfg.name == "child"


def test_inherit_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    b = write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(b)


def test_missing_file_and_missing_parent(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path, "child.yaml", "inherit: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(child)


def test_dotted_overrides_parse_types():
    cfg = load_config(CONFIGS / "quickstart.yaml",
                      ["train.lr=3e-4", "model.n_layers=2", "model.time_conditioning=true", "name=x"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layers == 2 and cfg.model.time_conditioning is True and cfg.name == "x"


def test_override_beats_file(tmp_path):
    path = write(tmp_path, "r.yaml", "train:\n  steps: 5\n")
    assert load_config(path, ["train.steps=6"]).train.steps == 6


def test_unknown_key_in_override_names_closest_key():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "lm1b_bell.yaml", ["model.n_layer=4"])
    assert "--set" in str(e.value) and "model.n_layer" in str(e.value) and "`model.n_layers`" in str(e.value)


def test_unknown_key_in_file_names_file_and_closest_key(tmp_path):
    path = write(tmp_path, "typo.yaml", "diffusion:\n  time_samplr: bell\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "diffusion.time_samplr" in msg and "`diffusion.time_sampler`" in msg


def test_key_in_wrong_section_is_found_by_name():
    with pytest.raises(ConfigError, match="`model.n_layers`"):
        load_config(None, ["n_layers=3"])


def test_nonexistent_key_still_gets_a_suggestion():
    with pytest.raises(ConfigError, match="closest valid key is `model\\."):
        load_config(CONFIGS / "lm1b_bell.yaml", ["model.nonexistent=1"])


def test_wrong_type_says_what_is_expected(tmp_path):
    path = write(tmp_path, "t.yaml", "train:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "train.steps" in str(e.value) and "expected int" in str(e.value)


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["model=3"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=-1", "`train.lr` = -1.0: must be > 0"),
        ("model.block_size=5", "must divide data.seq_len = 168"),
        ("model.variant=mmd", "must be one of ar, mdm"),
        ("diffusion.time_sampler=beta", "must be one of uniform, antithetic, bell"),
        ("model.d_model=130", "divisible by model.n_heads"),
        ("model.dropout=1.5", "must be in [0, 1)"),
        ("train.steps=0", "`train.steps` = 0: must be >= 1"),
        ("diffusion.eps=0.7", "must be in [0, 0.5)"),
        ("data.packing=stack", "must be one of pad, wrap"),
        ("parallel.tp=2", "must be a multiple of parallel.tp x parallel.pp = 2"),
        ("parallel.pp=0", "`parallel.pp` = 0: must be >= 1"),
        ("parallel.zero_stage=4", "must be 0, 1, 2 or 3"),
        ("train.micro_batch_size=5", "must be a multiple of micro_batch_size"),
    ],
)
def test_out_of_range_values_say_what_is_allowed(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "quickstart.yaml", [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["parallel.zero_stage=2"], "DeepSpeed's pipeline engine does not combine with ZeRO-2/3"),
        (["model.tie_embeddings=true"], "the embedding and the head sit on different stages"),
        (["model.n_layers=1"], "must be <= model.n_layers = 1"),
    ],
)
def test_pipeline_layouts_the_engine_cannot_run_are_refused(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "quickstart.yaml", ["launch.nproc=2", "parallel.pp=2", *overrides])
    assert fragment in str(e.value)
    load_config(CONFIGS / "quickstart.yaml", ["launch.nproc=2", "parallel.pp=2"])  # the plain pp=2 layout is valid


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.n_heads=2", "model.d_model=64", "parallel.tp=4"],
         "`parallel.tp` = 4: must divide model.n_heads = 2 (attention is split by whole heads; allowed: 1, 2)"),
        (["model.n_heads=3", "model.d_model=96", "parallel.tp=2"], "must divide model.n_heads = 3"),
        # gelu hidden = 1.25 x 40 = 50: the 4 heads split over 4 ranks, the 50 columns do not
        (["model.mlp=gelu", "model.mlp_ratio=1.25", "model.d_model=40", "model.n_heads=4", "parallel.tp=4"],
         "must divide the MLP hidden size 50"),
        (["model.mlp=swiglu", "model.mlp_ratio=1.0", "model.d_model=12", "model.n_heads=2", "parallel.tp=2",
          "launch.nproc=2"], None),  # swiglu hidden 8: divisible, accepted
    ],
)
def test_tensor_parallel_shapes_are_checked_before_any_process_starts(overrides, fragment):
    over = ["launch.nproc=4", *overrides]
    if fragment is None:
        load_config(CONFIGS / "quickstart.yaml", over)
        return
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "quickstart.yaml", over)
    assert fragment in str(e.value)


def test_tp_shape_errors_refuse_the_launch_before_spawning(tmp_path):
    """The launcher validates the config before starting ranks: the error comes in seconds, not
    after every rank has imported megatron-core and died in apply_tensor_parallel."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.launch", "--config", str(CONFIGS / "quickstart.yaml"), "--set",
         "launch.nproc=2", "parallel.tp=2", "model.n_heads=3", "model.d_model=96", "tracking.enabled=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "must divide model.n_heads = 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # no run directory, no rank started
    assert time.monotonic() - start < 60


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=-1", "train.steps=0"])
    assert "train.lr" in str(e.value) and "train.steps" in str(e.value)


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(CONFIGS / "lm1b_bell.yaml", ["train.lr=1e-4"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert flatten(load_config(tmp_path / "resolved.yaml")) == flatten(cfg)


@pytest.mark.parametrize(("overrides", "refused"), [
    ([], True),  # logit-normal(0, 1): w(t)/q(t) ~ 6e10 at eps, infinite variance at t -> 1
    (["diffusion.eps=0.05"], True),  # a larger eps does not help the t -> 1 end of a logit-normal
    (["diffusion.bell.family=beta"], True),  # Beta(2, 2): b >= 2, (1 - t)^(1 - b) not integrable
    (["diffusion.bell.family=beta", "diffusion.bell.b=1.5"], False),
    (["diffusion.bell.family=beta", "diffusion.bell.b=1.5", "diffusion.eps=0.05"], False),
    (["diffusion.weighting=reweighted"], False),  # the bell as a training surrogate: plain w(t)
    (["model.variant=jigsaw", "model.block_size=1", "data.seq_len=256"], True),  # P_q(m) ~ 0 for small m
    (["model.variant=jigsaw", "model.block_size=64", "data.seq_len=256"], False),  # 4 blocks: bounded
    (["model.variant=ar"], False),  # no diffusion weights at all
])
def test_elbo_with_a_bell_is_refused_when_its_weights_explode(overrides, refused):
    sets = ["diffusion.time_sampler=bell", "diffusion.weighting=elbo", *overrides]
    if not refused:
        load_config(None, sets)
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    msg = str(err.value)
    # names the key, the reason and the keys to change
    for fragment in ("`diffusion.weighting` = 'elbo'", "variance", "diffusion.weighting=reweighted",
                     "diffusion.bell.b < 2"):
        assert fragment in msg, msg
    if "model.variant=jigsaw" not in overrides and "diffusion.eps=0.05" not in overrides:
        assert "infinite" in msg and "at t = eps" in msg


def test_shipped_bell_recipes_pass_the_elbo_check():
    for path in CONFIGS.rglob("*.yaml"):
        cfg = load_config(path)
        assert not (cfg.diffusion.time_sampler == "bell" and cfg.diffusion.weighting == "elbo"
                    and cfg.diffusion.bell.family == "logit_normal"), path
