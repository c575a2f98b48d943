"""A dlm-pretrain model as a `transformers` model (written into an export by pretrain.convert --hf).

    model = AutoModelForMaskedLM.from_pretrained(OUT, trust_remote_code=True)   # diffusion variants
    model = AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)   # variant ar
    logits = model(input_ids).logits                                            # [B, L, V]

The backbone is this framework's own `DiffusionTransformer` (dlm_transformer.py, a copy of
pretrain/model/transformer.py), so the logits are the checkpoint's. Masked positions hold
`config.mask_token_id`; `attention_mask` is the key-padding mask (1 = real token); `t` (diffusion
time, [B]) is needed by time-conditioned models only; `prompt_mask` by Scatter/Jigsaw models trained
on responses. Decoding (the diffusion samplers) is not `generate()`: use `python -m pretrain.generate`.
The tokenizer the model was trained with is in dlm_tokenizer/ (`data_pipeline.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from .dlm_transformer import DiffusionTransformer, rotary_tables


class DLMConfig(PretrainedConfig):
    model_type = "dlm"

    def __init__(self, dlm_model: dict | None = None, max_seq_len: int = 0, mask_token_id: int = 0,
                 schedule: str = "loglinear", **kwargs):
        self.dlm_model = dict(dlm_model or {})  # pretrain.config.ModelConfig's fields
        self.max_seq_len = max_seq_len
        self.mask_token_id = mask_token_id
        self.schedule = schedule  # the noise schedule it was trained with (alpha_t)
        super().__init__(**kwargs)


class DLMPreTrainedModel(PreTrainedModel):
    config_class = DLMConfig
    base_model_prefix = "model"

    def __init__(self, config: DLMConfig):
        super().__init__(config)
        self.model = DiffusionTransformer(SimpleNamespace(**config.dlm_model), config.vocab_size, config.max_seq_len)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the export; the rotary tables are computed
        if isinstance(module, DiffusionTransformer):
            cfg = module.cfg
            cos, sin = rotary_tables(module.max_seq_len, cfg.d_model // cfg.n_heads)
            module.rope_cos, module.rope_sin = cos.to(module.tok_emb.weight.device), sin.to(module.tok_emb.weight.device)

    def _logits(self, input_ids, attention_mask=None, t=None, prompt_mask=None):
        if self.model.rope_cos.is_meta:  # built on the meta device by from_pretrained: recompute
            self._init_weights(self.model)
        kpm = None if attention_mask is None else attention_mask.bool()
        pm = None if prompt_mask is None else prompt_mask.bool()
        return self.model(input_ids, t=t, key_padding_mask=kpm, prompt_mask=pm)


class DLMForMaskedLM(DLMPreTrainedModel):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, t: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, **kwargs) -> MaskedLMOutput:
        return MaskedLMOutput(logits=self._logits(input_ids, attention_mask, t, prompt_mask))


class DLMForCausalLM(DLMPreTrainedModel):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        return CausalLMOutput(logits=self._logits(input_ids, attention_mask))
