"""`python -m pretrain.evaluate` scores the weights inference uses: for a run trained with EMA
(train.ema > 0) the moving average, the model `load_model_for_inference` gives (issue 21 item 6:
it read the raw model.pt and reported the raw weights' NLL); `--no-ema` scores the raw weights."""

import json

import pytest
import torch

from data_pipeline.build import ensure_shards
from data_pipeline.stream import make_val_loader
from pretrain.checkpoint import load_model_for_inference
from pretrain.config import load_config
from pretrain.evaluate import main as evaluate
from pretrain.evaluate import validation_nll
from pretrain.train import train
from pretrain.variants import build_objective

SMALL = [
    "data.task.num_train=64", "data.task.num_val=16", "train.batch_size=8", "train.eval_batches=1",
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.steps=4", "train.eval_every=4",
    "train.log_every=2", "train.checkpoint_every=4", "train.ema=0.5", "train.lr=1e-2", "train.warmup_steps=1",
    "tracking.enabled=false", "train.device=cpu", "train.dtype=fp32", "tracking.log_samples=0",
]


def nll_of(model, cfg, batches: int) -> float:
    info = ensure_shards(cfg.data, progress=False)
    objective = build_objective(cfg.diffusion, cfg.model.variant, mask_id=info.mask_id,
                                jigsaw_streams=cfg.model.jigsaw_streams)
    loader = make_val_loader(cfg.data, info, batch_size=min(cfg.train.batch_size, 64))
    return validation_nll(model, objective, loader, torch.device("cpu"), seed=cfg.seed, max_batches=batches)["val/nll"]


def test_evaluate_reports_the_moving_average_that_inference_loads(tmp_path):
    cfg = load_config("configs/quickstart.yaml", [*SMALL, f"data.shard_dir={tmp_path / 'shards'}"])
    run = tmp_path / "run"
    train(cfg, run, "ema")
    averaged, info = load_model_for_inference(run)
    raw, _ = load_model_for_inference(run, ema=False)
    assert info["ema"] is True
    want, want_raw = nll_of(averaged, cfg, 2), nll_of(raw, cfg, 2)
    assert abs(want - want_raw) > 1e-4  # the average differs from the weights: the test can tell them apart

    common = ["--run", str(run), "--eval-batches", "2", "--num-samples", "1", "--batch-size", "1",
              "--device", "cpu", "--no-mlflow"]
    assert evaluate([*common, "--json", str(tmp_path / "ema.json")]) == 0
    got = json.loads((tmp_path / "ema.json").read_text())["metrics"]["val/nll"]
    assert got == pytest.approx(want, rel=1e-6)

    assert evaluate([*common, "--no-ema", "--json", str(tmp_path / "raw.json")]) == 0
    assert json.loads((tmp_path / "raw.json").read_text())["metrics"]["val/nll"] == pytest.approx(want_raw, rel=1e-6)
