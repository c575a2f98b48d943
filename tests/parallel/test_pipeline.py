"""Pipeline parallelism (parallel/pipeline.py).

In one process: the stage layers run in sequence compute exactly the plain model's logits for every
variant (two-stream passes, time conditioning, padding), and capturing the objective's model call
then replaying its loss on given logits reproduces the objective's loss exactly. Across processes
(real gloo groups, DeepSpeed's pipeline engine): pp=2 matches pp=1 for the two-stream Jigsaw with
time conditioning, a pp=2 run resumes from its own checkpoint exactly, and a pp=2 checkpoint
consolidates to the weights (and weight average) a single process trains.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.pipeline import capture_forward, plain_key, replay, stage_inputs, stage_layers
from pretrain.callbacks import read_metrics
from pretrain.checkpoint import _write_latest, checkpoint_root
from pretrain.config import DiffusionConfig, ModelConfig
from pretrain.convert import consolidated_state_dict
from pretrain.diffusion import step_rng
from pretrain.model import build_model
from pretrain.variants import build_objective

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
V, L, MASK = 16, 16, 15
CASES = [
    ("ar", False, "uniform"), ("mdm", False, "uniform"), ("mdm", True, "uniform"), ("mdm", False, "complementary"),
    ("block", False, "uniform"), ("block", True, "uniform"), ("block", True, "complementary"), ("jigsaw", True, "uniform"), ("scatter", False, "uniform"),
    # task data: the prompt travels through the stages (inside the padding tensor)
    ("scatter", False, "prompt"), ("jigsaw", False, "prompt"), ("jigsaw", True, "prompt"), ("mdm", False, "prompt"),
]


def model_and_objective(variant: str, time_conditioning: bool, masking: str):
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(), variant=variant, n_layers=3, d_model=32, n_heads=4, block_size=4,
                              time_conditioning=time_conditioning, cond_dim=16)
    model = build_model(cfg, V, L)
    masking = "uniform" if masking == "prompt" else masking
    objective = build_objective(DiffusionConfig(masking=masking), variant, mask_id=MASK)
    return model, objective


def batch(prompt: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MASK, (3, L), generator=g)
    real = torch.ones(3, L, dtype=torch.bool)
    real[1, 11:] = False  # padding: the masks must carry it through every stage
    density = torch.rand(3, L, generator=g)  # for the complementary (density-priority) masking
    out = {"input_ids": ids, "loss_mask": real, "density": density}
    if prompt:
        out["prompt_mask"] = torch.arange(L)[None, :] < torch.tensor([[3], [6], [5]])
    return out


def run_stages(layers, inputs):
    x = inputs
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("variant,time_conditioning,masking", CASES)
def test_stages_in_sequence_compute_the_plain_models_logits(variant, time_conditioning, masking):
    model, objective = model_and_objective(variant, time_conditioning, masking)
    model.eval()
    args, kwargs = capture_forward(model, objective.training_loss, batch(masking == "prompt"), step_rng(0, 3))
    with torch.no_grad():
        expected = model(*args, **kwargs)
        got = run_stages(stage_layers(model), stage_inputs(args, kwargs))
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("variant,time_conditioning,masking", CASES)
def test_capture_then_replay_reproduces_the_objectives_loss_and_gradients(variant, time_conditioning, masking):
    model, objective = model_and_objective(variant, time_conditioning, masking)
    b = batch(masking == "prompt")
    loss, stats = objective.training_loss(model, b, step_rng(0, 5, micro=1, n_micro=2))
    loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    args, kwargs = capture_forward(model, objective.training_loss, b, step_rng(0, 5, micro=1, n_micro=2))
    logits = run_stages(stage_layers(model), stage_inputs(args, kwargs))
    replayed, replay_stats = replay(model, objective.training_loss, logits, b,
                                    step_rng(0, 5, micro=1, n_micro=2))
    replayed.backward()
    assert float(replayed.detach()) == float(loss.detach()) and replay_stats["n_tokens"] == stats["n_tokens"]
    for name, p in model.named_parameters():
        if name in expected_grads:
            assert torch.equal(p.grad, expected_grads[name]), name


def test_capture_refuses_an_objective_that_never_calls_the_model():
    with pytest.raises(RuntimeError, match="never called the model"):
        capture_forward(torch.nn.Linear(1, 1), lambda model, x: x, 1)


def test_layer_keys_map_to_the_plain_models_keys():
    model, _ = model_and_objective("mdm", True, "uniform")
    layers = stage_layers(model)
    mapped = {plain_key(i, k, len(layers) - 2) for i, layer in enumerate(layers) for k in layer.state_dict()}
    assert mapped == set(model.state_dict())


def test_tied_embeddings_are_refused_with_a_reason():
    cfg = dataclasses.replace(ModelConfig(), n_layers=2, d_model=32, n_heads=4, tie_embeddings=True)
    with pytest.raises(ValueError, match="tie_embeddings"):
        stage_layers(build_model(cfg, V, L))


# ---------------------------------------------------------------------------- real multi-process runs

COMMON = [
    "data.task.num_train=256", "data.task.num_val=32", "train.batch_size=8", "train.eval_batches=1",
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "train.log_every=1", "train.warmup_steps=2",
    "tracking.enabled=false", "train.device=cpu", "train.dtype=fp32",
]


def launch(cwd: Path, shards: Path, extra: list[str]) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.launch", "--config", str(QUICKSTART), "--set", *COMMON,
         f"data.shard_dir={shards}", *extra],
        # one BLAS/OpenMP thread per process: weights are compared across runs to 1e-5, and a thread count
        # that differs between runs changes summation order, which Adam amplifies on weights whose
        # gradient is near zero (a loaded full-suite run once saw 6e-5; cause not pinned down further)
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (cwd / "runs" / "quickstart").iterdir()
    return run_dir


@pytest.mark.slow
def test_pp2_matches_pp1_for_jigsaw_with_time_conditioning(tmp_path):
    jigsaw = ["model.variant=jigsaw", "model.block_size=4", "model.time_conditioning=true", "train.steps=6",
              "train.eval_every=6"]
    (tmp_path / "pp1").mkdir()
    (tmp_path / "pp2").mkdir()
    one = read_metrics(launch(tmp_path / "pp1", tmp_path / "shards", [*jigsaw, "launch.nproc=1"]))
    two = read_metrics(launch(tmp_path / "pp2", tmp_path / "shards", [*jigsaw, "launch.nproc=2", "parallel.pp=2"]))
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step
        assert two[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=1e-4), step
    assert one[6]["train/loss"] < one[1]["train/loss"]


@pytest.mark.slow
def test_pp2_resumes_exactly_and_consolidates_to_plain_weights(tmp_path):
    steps = ["train.steps=6", "train.eval_every=6", "train.checkpoint_every=3", "train.keep_checkpoints=3",
             "train.ema=0.8"]
    pp2 = ["launch.nproc=2", "parallel.pp=2", *steps]
    (tmp_path / "pp1").mkdir()
    (tmp_path / "pp2").mkdir()
    run = launch(tmp_path / "pp2", tmp_path / "shards", pp2)
    whole = read_metrics(run)

    # the pipeline checkpoint holds the same weights a single process trains
    single = launch(tmp_path / "pp1", tmp_path / "shards", ["launch.nproc=1", *steps])
    a = consolidated_state_dict(checkpoint_root(run) / "step_0000003")
    b = consolidated_state_dict(checkpoint_root(single) / "step_0000003")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # and so does its weight average, kept per stage under the stage's names
    ema_a = consolidated_state_dict(checkpoint_root(run) / "step_0000003", ema=True)
    ema_b = consolidated_state_dict(checkpoint_root(single) / "step_0000003", ema=True)
    assert sorted(ema_a) == sorted(ema_b) == sorted(b)
    for key in ema_a:
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=1e-5, atol=1e-6)

    # roll the run back to step 3 and relaunch the same command: it resumes and retraces 4..6
    _write_latest(checkpoint_root(run), "step_0000003")
    metrics_file = run / "metrics.jsonl"
    metrics_file.write_text("".join(line + "\n" for line in metrics_file.read_text().splitlines()
                                    if '"kind": "train"' not in line or int(line.split('"step": ')[1].split(",")[0]) <= 3))
    launch(tmp_path / "pp2", tmp_path / "shards", pp2)
    resumed = read_metrics(run)
    for step in (4, 5, 6):
        assert resumed[step]["train/loss"] == whole[step]["train/loss"], step
