"""EMA of the weights (train.ema): the update rule, swapping in and out, validation on the average,
checkpoints that carry it across a resume, and `convert --ema` / inference loading that export it."""

import pytest
import torch
from torch import nn

from pretrain.callbacks import read_metrics
from pretrain.checkpoint import _write_latest, checkpoint_root, latest_checkpoint, load_model_for_inference
from pretrain.config import ConfigError, load_config
from pretrain.convert import consolidated_state_dict
from pretrain.ema import EMA
from pretrain.evaluate import validation_nll
from pretrain.train import Trainer, train

SMALL = [
    "data.task.num_train=128", "data.task.num_val=32", "train.batch_size=8", "train.eval_batches=2",
    "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "train.steps=6", "train.eval_every=6",
    "train.log_every=1", "train.checkpoint_every=3", "train.keep_checkpoints=3", "train.ema=0.8",
    "tracking.enabled=false", "train.device=cpu", "train.dtype=fp32", "tracking.log_samples=0",
]


def test_update_is_the_exponential_average_and_applied_swaps_back():
    layer = nn.Linear(3, 2)
    ema = EMA(layer, decay=0.75)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    expected = 0.75 * start + 0.25 * (start + 1.0)
    assert torch.allclose(ema.state_dict()["weight"], expected)
    trained = layer.weight.detach().clone()
    with ema.applied():
        assert torch.allclose(layer.weight, expected)
    assert torch.equal(layer.weight, trained)


def test_loading_an_average_of_another_model_names_what_is_missing():
    ema = EMA(nn.Linear(3, 2), decay=0.9)
    with pytest.raises(KeyError, match="lacks 1 parameters"):
        ema.load_state_dict({"weight": torch.zeros(2, 3)})


@pytest.mark.parametrize("override,message", [
    ("train.ema=1.0", "train.ema"),
    ("train.ema=-0.5", "train.ema"),
])
def test_config_refuses_a_decay_outside_0_1(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", [override])


def test_config_refuses_ema_under_zero3():
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config("configs/quickstart.yaml", ["train.ema=0.9", "parallel.zero_stage=3"])


def test_validation_runs_on_the_average_and_resume_continues_it(tmp_path):
    cfg = load_config("configs/quickstart.yaml", [*SMALL, f"data.shard_dir={tmp_path / 'shards'}"])
    run = tmp_path / "run"
    train(cfg, run, "ema")
    final = latest_checkpoint(run)
    averaged = consolidated_state_dict(final, ema=True)
    weights = consolidated_state_dict(final)
    assert sorted(averaged) == sorted(weights)
    assert any(not torch.equal(averaged[k], weights[k]) for k in weights)  # the average lags the weights

    # the logged validation NLL is that of the averaged weights, which inference loads by default
    model, info = load_model_for_inference(run)
    assert info["ema"] is True
    trainer = Trainer(cfg, tmp_path / "scratch", trainer_topology(), [])
    nll = validation_nll(model, trainer.objective, trainer.val_loader, torch.device("cpu"), seed=cfg.seed,
                         max_batches=cfg.train.eval_batches)["val/nll"]
    assert nll == pytest.approx(read_metrics(run, "eval")[6]["val/nll"], rel=1e-6)
    raw, raw_info = load_model_for_inference(run, ema=False)
    assert raw_info["ema"] is False

    # roll back to step 3 and continue: the same average at step 6
    _write_latest(checkpoint_root(run), "step_0000003")
    train(cfg, run, "ema")
    resumed = consolidated_state_dict(latest_checkpoint(run), ema=True)
    for key in averaged:
        assert torch.equal(resumed[key], averaged[key]), key


def test_convert_ema_of_a_run_without_average_says_so(tmp_path):
    cfg = load_config("configs/quickstart.yaml", [*SMALL, "train.ema=0", "train.steps=2", "train.eval_every=2",
                                                  f"data.shard_dir={tmp_path / 'shards'}"])
    train(cfg, tmp_path / "run", "plain")
    from pretrain.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no weight average"):
        consolidated_state_dict(latest_checkpoint(tmp_path / "run"), ema=True)


def trainer_topology():
    from parallel.topology import Topology

    return Topology()
