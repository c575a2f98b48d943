"""The attention kernel per batch (issue 18 item 14): padded batches through FlexAttention with a
block mask from per-row lengths give the outputs of the dense-mask reference (SDPA with
attention_masks.attention_mask) for every variant's rule; a batch without padding passes no mask to
SDPA for the all-to-all and causal variants (so flash can run on a GPU); the cases FlexAttention
cannot take fall back to the dense mask; the kernel is reported and logged once.

FlexAttention runs eagerly on CPU here (its reference implementation: the same rule, unfused);
on CUDA the model compiles it. Tolerance: 1e-5 absolute in fp32 (two softmax implementations
summing in different orders; measured differences are ~1e-7).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.model import attention_kernel as ak
from pretrain.model import build_model
from pretrain.model.attention_masks import attention_mask

pytestmark = pytest.mark.skipif(not ak.flex_available(), reason="torch without FlexAttention")

L, BS = 12, 4
LENGTHS = [12, 7, 3]


def padding(lengths=LENGTHS, seq_len=L) -> torch.Tensor:
    return torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("variant", ["mdm", "ar", "block", "scatter", "jigsaw"])
def test_flex_block_mask_equals_the_dense_mask_on_padded_batches(variant):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, L, 16, generator=g) for _ in range(3))
    pad = padding()
    mask, is_causal, kernel = ak.attention_inputs(variant, L, BS, torch.device("cpu"), pad, use_flex=True)
    assert kernel == "flex:block-mask" and ak.is_block_mask(mask) and not is_causal
    dense, dense_causal = attention_mask(variant, L, BS, "cpu", pad)
    assert dense is not None and not dense_causal
    # the block mask's rule, evaluated densely, is the dense mask itself
    rule = mask.mask_mod
    b, qi, ki = torch.meshgrid(torch.arange(3), torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(rule(b, torch.zeros_like(b), qi, ki), dense[:, 0])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    out = ak.flex_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _model(variant: str, **over):
    sets = [f"model.variant={variant}", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
            f"model.block_size={BS}", f"data.seq_len={L}", *(f"model.{k}={v}" for k, v in over.items())]
    cfg = load_config(None, ["data.source=task:sudoku", *sets])
    torch.manual_seed(0)
    return build_model(cfg.model, 20, L).eval()


@pytest.mark.parametrize("variant", ["mdm", "block"])
def test_model_logits_match_between_flex_and_dense_and_the_kernel_is_reported(variant):
    model = _model(variant)
    ids = torch.randint(0, 20, (3, L), generator=torch.Generator().manual_seed(1))
    pad = padding()
    with torch.no_grad():
        model.use_flex = False
        dense = model(ids, key_padding_mask=pad)
        assert model.attention_kernel == "sdpa:dense-mask"
        model.use_flex = True
        flex = model(ids, key_padding_mask=pad)
        assert model.attention_kernel == "flex:block-mask"
    torch.testing.assert_close(flex[pad], dense[pad], atol=1e-5, rtol=0)
    assert ak.kernels_used().get("flex:block-mask", 0) >= 1


def test_no_padding_passes_no_mask_to_sdpa(monkeypatch):
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask, is_causal))
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 20, (3, L))
    full = torch.ones(3, L, dtype=torch.bool)
    for variant, causal, kernel in [("mdm", False, "sdpa:no-mask"), ("ar", True, "sdpa:causal")]:
        model = _model(variant)
        model.use_flex = True  # even where FlexAttention is allowed, no padding needs no mask
        seen.clear()
        with torch.no_grad():
            model(ids, key_padding_mask=full)
        assert model.attention_kernel == kernel
        assert seen == [(None, causal)] * 2  # both layers, no mask at all
        seen.clear()
        with torch.no_grad():
            model.use_flex = False
            model(ids, key_padding_mask=padding())
        assert model.attention_kernel == "sdpa:dense-mask" and all(m is not None for m, _ in seen)


def test_mdlm_dropout_keeps_flex_in_training_and_attention_dropout_does_not():
    """The LM1B recipes' dropout 0.1 is MDLM's (attention and MLP outputs, not the attention
    probabilities: its flash kernel runs with dropout_p 0), so their padded training batches still
    take FlexAttention; only model.attention_dropout forces the dense mask. The embeddings get no
    dropout unless model.embedding_dropout asks."""
    ids = torch.randint(0, 20, (3, L), generator=torch.Generator().manual_seed(1))
    recipe = load_config("configs/lm1b_bell.yaml").model
    assert recipe.dropout == 0.1 and recipe.attention_dropout == 0.0 and recipe.embedding_dropout == 0.0
    model = _model("mdm", dropout=0.1).train()
    model.use_flex = True
    ctx = model.context(L, torch.device("cpu"), key_padding_mask=padding())
    assert ctx.kernel == "flex:block-mask"
    x, _ = model.embed(ids)
    torch.testing.assert_close(x, model.tok_emb(ids), atol=0, rtol=0)  # no embedding dropout
    assert all(b.attn.dropout == 0.0 and b.drop.p == 0.1 for b in model.blocks)
    model = _model("mdm", dropout=0.1, attention_dropout=0.1).train()
    model.use_flex = True
    assert model.context(L, torch.device("cpu"), key_padding_mask=padding()).kernel == "sdpa:dense-mask"
    model = _model("mdm", embedding_dropout=0.5).train()
    assert not torch.equal(model.embed(ids)[0], model.tok_emb(ids))


def test_cases_flex_cannot_take_fall_back_to_the_dense_mask():
    cpu = torch.device("cpu")
    pad = padding()
    # dropout in training (FlexAttention has none)
    _, _, kernel = ak.attention_inputs("mdm", L, BS, cpu, pad, dropout_active=True, use_flex=True)
    assert kernel == "sdpa:dense-mask"
    # a per-sequence mask: scatter with a prompt
    prompt = torch.zeros(3, L, dtype=torch.bool)
    prompt[:, :2] = True
    mask, _, kernel = ak.attention_inputs("scatter", L, BS, cpu, pad, prompt_mask=prompt, use_flex=True)
    assert kernel == "sdpa:dense-mask" and mask.shape == (3, 1, L, L)
    # padding that is not a suffix of the row
    holes = pad.clone()
    holes[0, 3] = False
    _, _, kernel = ak.attention_inputs("mdm", L, BS, cpu, holes, use_flex=True)
    assert kernel == "sdpa:dense-mask"
    # the default on CPU is SDPA's dense mask
    _, _, kernel = ak.attention_inputs("mdm", L, BS, cpu, pad)
    assert kernel == "sdpa:dense-mask"


def test_each_kernel_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(ak, "_USED", {})
    model = _model("mdm")
    ids = torch.randint(0, 20, (3, L))
    with caplog.at_level(logging.INFO, logger=ak.__name__), torch.no_grad():
        for _ in range(3):
            model(ids, key_padding_mask=padding())
    lines = [r.getMessage() for r in caplog.records if r.name == ak.__name__]
    assert lines == ["attention kernel: sdpa:dense-mask"]
    assert ak.kernels_used() == {"sdpa:dense-mask": 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
def test_flex_gradients_match_dense_under_activation_checkpointing():
    """Training through FlexAttention (compiled, no dropout) with checkpointed blocks gives the
    gradients of the dense-mask path, so the GPU path trains the same model (recompute included).
    CUDA only: torch's FlexAttention refuses a backward on CPU."""
    from parallel.activation_checkpointing import apply_activation_checkpointing

    ids = torch.randint(0, 20, (3, L), generator=torch.Generator().manual_seed(2)).cuda()
    pad = padding().cuda()
    grads = {}
    for use_flex in (False, True):
        model = _model("block").cuda().train()
        apply_activation_checkpointing(model, "all")
        model.use_flex = use_flex
        logits = model(ids, key_padding_mask=pad)
        F.cross_entropy(logits[pad], ids[pad]).backward()
        grads[use_flex] = {n: p.grad for n, p in model.named_parameters()}
        assert model.attention_kernel == ("flex:block-mask" if use_flex else "sdpa:dense-mask")
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-4, rtol=1e-3)
