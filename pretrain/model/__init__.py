"""The model: one transformer backbone and the attention-mask family (see transformer.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.config_file import ConfigError
from pretrain.model.attention_masks import attention_mask, base_mask
from pretrain.model.kv_cache import KVCache, cache_support
from pretrain.model.transformer import DiffusionTransformer

if TYPE_CHECKING:  # annotations only: the config sits above the model (it reads the variant table)
    from pretrain.config import ModelConfig

__all__ = ["DiffusionTransformer", "KVCache", "attention_mask", "base_mask", "build_model", "cache_support", "unwrap"]


def build_model(cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> DiffusionTransformer:
    """The model for `cfg`, with the tokenizer's vocabulary size (mask token included) and the
    data's sequence length. `cfg.vocab_size` (0 = take the tokenizer's) is a guard against a
    checkpoint or recipe written for another tokenizer."""
    if cfg.vocab_size and cfg.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size = {cfg.vocab_size} but the tokenizer has {vocab_size} tokens; "
            f"set model.vocab_size=0 (take it from the tokenizer) or use the matching tokenizer"
        )
    return DiffusionTransformer(cfg, vocab_size=vocab_size, max_seq_len=max_seq_len)


def unwrap(model):
    """The plain model inside an engine's wrapper (DDP and DeepSpeed keep it in `.module`), for what
    only the plain model has: its config, `block_len`, `prefill`."""
    return getattr(model, "module", model)
