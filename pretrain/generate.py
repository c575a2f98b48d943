"""Generate text from a trained run: `python -m pretrain.generate --run RUN_DIR --prompt "..."`.

    python -m pretrain.generate --run runs/quickstart/quickstart-s0-1a2b3c4d \\
        --prompt "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79=" \\
        --max-new-tokens 81
    python -m pretrain.generate --run runs/lm1b/RUN --prompt "The cat" --temperature 1 --num-samples 4

The model is loaded through `pretrain.checkpoint.load_model_for_inference` (any layout; the moving
average of the weights when the run kept one, `--no-ema` for the raw weights), the prompt is encoded
with the run's own tokenizer (the one saved with its shards), and `--max-new-tokens` positions after
`[BOS] prompt` are filled by a sampler of `pretrain/sample.py` (`--sampler auto`: the variant's own).
Diffusion samplers fill all positions together, so there is nothing to stream: the text of each
sample is printed when it is done, cut at the first [EOS]. Models trained on responses
(data.train_on; task recipes) get `[BOS] prompt` as their prompt_mask, as in training.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common.device import resolve_device
from data_pipeline.build import ensure_shards, resolve_shard_dir
from data_pipeline.stream import trains_on_response
from data_pipeline.tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer
from pretrain.checkpoint import CheckpointError, load_model_for_inference
from pretrain.config import ConfigError
from pretrain.diffusion.schedules import build_schedule
from pretrain.sample import SAMPLERS, SamplerConfig, generate, resolve_sampler


@dataclass
class Generation:
    texts: list[str]  # one per sample, cut at the first EOS
    full_texts: list[str]  # prompt and continuation decoded together (word boundaries kept)
    tokens: torch.Tensor  # Long[N, max_new_tokens]: the generated ids (EOS and after included)
    nfe: int  # model forwards
    sampler: str
    ema: bool


def load_tokenizer_for(cfg):
    """The run's tokenizer: the one saved with its shards (built first when they are gone)."""
    shard_dir = resolve_shard_dir(cfg.data)
    if (shard_dir / TOKENIZER_FILE).is_file():
        return load_tokenizer(shard_dir)
    return ensure_shards(cfg.data, progress=False).tokenizer


def load_run(run: str | Path, device: str | torch.device = "cpu", ema: bool | None = None):
    """(model, info, Config, tokenizer) of a run or checkpoint directory, for inference."""
    model, info = load_model_for_inference(run, device=device, ema=ema)
    cfg = info["config"]
    tok = load_tokenizer_for(cfg)
    if tok.vocab_size != info["vocab_size"]:
        raise ValueError(f"the tokenizer of {cfg.data.source} has {tok.vocab_size} tokens, the model "
                         f"{info['vocab_size']}: the shard directory was rebuilt with another tokenizer")
    return model, info, cfg, tok


@torch.no_grad()
def generate_text(model, cfg, tok, prompt: str = "", max_new_tokens: int = 64, num_samples: int = 1,
                  sampler_cfg=None, ema: bool = False, prompt_ids: list[int] | None = None) -> Generation:
    """Fill `max_new_tokens` positions after `[BOS] prompt` for `num_samples` rows (`prompt_ids`:
    the prompt already encoded, instead of `prompt`)."""
    sampler_cfg = sampler_cfg or SamplerConfig()
    if prompt_ids is None:
        prompt_ids = tok.encode(prompt) if prompt else []
    ids = [tok.bos_id, *prompt_ids]
    L = len(ids) + max_new_tokens
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if L > cfg.data.seq_len:
        raise ValueError(f"[BOS] + prompt ({len(ids) - 1} tokens) + {max_new_tokens} new tokens = {L} exceed the "
                         f"model's sequence length data.seq_len = {cfg.data.seq_len}; shorten the prompt or "
                         f"lower --max-new-tokens to {cfg.data.seq_len - len(ids)}")
    device = next(model.parameters()).device
    x = torch.full((num_samples, L), tok.pad_id, dtype=torch.long, device=device)
    x[:, : len(ids)] = torch.tensor(ids, device=device)
    gen = torch.zeros(num_samples, L, dtype=torch.bool, device=device)
    gen[:, len(ids):] = True
    prompt_mask = None
    if trains_on_response(cfg.data):  # the model was trained with `[BOS] prompt` as its clean prompt
        prompt_mask = ~gen
    forbid = (tok.pad_id, tok.bos_id, tok.mask_id)
    out = generate(model, x, gen, None, mask_id=tok.mask_id, cfg=sampler_cfg, forbid_ids=forbid,
                   schedule=build_schedule(cfg.diffusion.schedule), prompt_mask=prompt_mask)
    new = out.tokens[:, len(ids):].cpu()
    texts, full = [], []
    for row in new.tolist():
        if tok.eos_id in row:
            row = row[: row.index(tok.eos_id)]
        texts.append(tok.decode(row))
        full.append(tok.decode([*prompt_ids, *row]))
    return Generation(texts=texts, full_texts=full, tokens=new, nfe=out.nfe, sampler=resolve_sampler(cfg.model.variant, sampler_cfg.name),
                      ema=ema)


def build_parser(prog: str = "python -m pretrain.generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text after [BOS]; empty = unconditional")
    p.add_argument("--max-new-tokens", type=int, default=64, help="positions to generate after the prompt")
    p.add_argument("--num-samples", type=int, default=1, help="samples drawn (one batch)")
    p.add_argument("--sampler", default="auto", choices=SAMPLERS, help="decoding (auto = the variant's own)")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (per block for block/semi-AR; 0 = one token per step)")
    p.add_argument("--block-size", type=int, default=0, help="semi-AR block size for the masked-diffusion samplers")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="top-k filtering (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filtering (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (the same seed gives the same text)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights, not their moving average (train.ema)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv: list[str] | None = None, prog: str = "python -m pretrain.generate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        device = resolve_device(args.device, "--device")
        model, info, cfg, tok = load_run(args.run, device, ema=False if args.no_ema else None)
        scfg = SamplerConfig(name=args.sampler, steps=args.steps, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, block_size=args.block_size, seed=args.seed)
        out = generate_text(model, cfg, tok, args.prompt, args.max_new_tokens, args.num_samples, scfg, info["ema"])
    except (CheckpointError, ConfigError, TokenizerError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {args.run}  step {info['step']}  variant {cfg.model.variant}  sampler {out.sampler}  "
          f"{'EMA' if out.ema else 'raw'} weights  T={args.temperature}  seed {args.seed}  {out.nfe} forwards",
          file=sys.stderr)
    for text in out.full_texts:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
