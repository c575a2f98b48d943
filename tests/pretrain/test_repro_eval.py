"""Seed 001's comparison is only fair if every masked-diffusion run is scored by the same bound:
the validation NLL must be the unbiased uniform-t NELBO whatever the run trained with (bell sampler,
reweighted loss), as `bench/repro_bell.sh` and `pretrain.compare --headline` assume."""

import dataclasses

import torch

from pretrain.config import DiffusionConfig, ModelConfig
from pretrain.diffusion import step_rng
from pretrain.evaluate import validation_nll
from pretrain.model import build_model
from pretrain.variants import build_objective

V, L, MASK = 20, 24, 19


def _objective(**kw):
    return build_objective(dataclasses.replace(DiffusionConfig(), **kw), "mdm", MASK)


def test_validation_nll_ignores_the_training_sampler_and_weighting():
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="mdm", n_layers=1, d_model=32, n_heads=2), V, L)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, MASK, (6, L), generator=g),
                "loss_mask": torch.ones(6, L, dtype=torch.bool)} for _ in range(2)]
    bell = _objective(time_sampler="bell", weighting="reweighted")
    uniform = _objective(time_sampler="uniform", weighting="elbo")
    scores = [validation_nll(model, obj, batches, torch.device("cpu"), seed=0)["val/nll"] for obj in (bell, uniform)]
    assert scores[0] == scores[1]
    # while their training losses differ (the bell run really trains on another objective)
    losses = [obj.training_loss(model, batches[0], step_rng(0, 0))[0].item() for obj in (bell, uniform)]
    assert losses[0] != losses[1]
