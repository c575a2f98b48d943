"""Validation: the NLL bound of the objective on a held-out split, deterministic given a seed.

Masked-diffusion objectives report the unbiased uniform-t NELBO whatever sampler trained them, so
runs with different time samplers stay comparable; AR reports exact next-token NLL. The same seed
gives the same t draws and masks on every pass, so successive evaluations differ only by the model.
Runs trained on responses (data.train_on; task recipes) report the bound on -log p(response | prompt)
per response token, and their samplers get the `[BOS] prompt` prefix as the model's prompt_mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

from common.device import resolve_device
from data_pipeline.build import ensure_shards, resolve_shard_dir
from data_pipeline.config import DensityConfig
from data_pipeline.sources import DataSourceUnavailable
from data_pipeline.stream import make_val_loader, trains_on_response
from data_pipeline.tasks import get_task
from data_pipeline.tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer
from pretrain.checkpoint import CheckpointError, load_model_for_inference, resolve_checkpoint, run_dir_of
from pretrain.config import ConfigError
from pretrain.diffusion.objective import Objective
from pretrain.diffusion.rng import SampleRNG
from pretrain.diffusion.schedules import build_schedule
from pretrain.sample import (
    JIGSAW_ORDERS,
    SAMPLERS,
    SamplerConfig,
    generate,
    generative_nll,
    sample_lengths,
    unigram_entropy,
)
from pretrain.tracking import RUN_ID_FILE, RUN_INFO_FILE
from pretrain.variants import objective_for, resolve_sampler

EVAL_SEED_OFFSET = 10_007  # eval draws never coincide with training draws of the same seed


@torch.no_grad()
def validation_nll(
    model: torch.nn.Module,
    objective: Objective,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    seed: int,
    max_batches: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> dict[str, float]:
    """Mean NLL in nats per token (and perplexity) over up to `max_batches` batches (0 = all).

    `batches` is data-parallel rank `dp_rank`'s share of the validation stream, which deals global
    sample g to rank g % dp_size (data_pipeline/stream.py): its j-th sample is g = j dp_size + dp_rank.
    Each sequence's t and masks are drawn from a generator seeded by (seed, g) (SampleRNG), so the
    same weights score the same on any layout. `reduce` sums (nll, tokens) over data-parallel ranks,
    so every rank reports the NLL of the whole evaluated set."""
    eval_seed = seed + EVAL_SEED_OFFSET
    was_training = model.training
    model.eval()
    total, count, seen = 0.0, 0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            n = batch["input_ids"].shape[0]
            rng = SampleRNG(eval_seed, (torch.arange(seen, seen + n) * dp_size + dp_rank).tolist())
            seen += n
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast or contextlib.nullcontext():
                nll_sum, n_tokens = objective.eval_nll(model, batch, rng)
            total += float(nll_sum)
            count += int(n_tokens)
    finally:
        model.train(was_training)
    if reduce is not None:
        total, count = (float(x) for x in reduce(torch.tensor([total, float(count)], dtype=torch.float64)))
        count = int(count)
    if count == 0:
        raise ValueError("the validation split produced no tokens: check data.val_split / data.val_fraction")
    nll = total / count
    return {"val/nll": nll, "val/ppl": math.exp(min(nll, 50.0)), "val/tokens": float(count)}


# ---------------------------------------------------------------------------------------------
# Post-training evaluation: `python -m pretrain.evaluate --run DIR | --checkpoint PATH [--no-ema]`
# ---------------------------------------------------------------------------------------------
# - val/nll: `validation_nll` over the run's validation split (the bound the trainer logs);
# - task runs (data.source task:NAME): the val split's examples are regenerated from the task's
#   seeded generator (the same documents the shards hold), each prompt is decoded by a sampler
#   (pretrain/sample.py) and scored by the task (`task/<metric>`, e.g. task/solved, task/mse);
# - language runs: unconditional samples ([BOS] + seq_len - 1 generated tokens, float64 draws) scored
#   by generative perplexity under a reference AR checkpoint of this framework (`--reference-ar`,
#   gen/ppl; tokens up to the first EOS) and their unigram entropy (gen/unigram_entropy).
# - the weights: the moving average (train.ema) when the run kept one, the weights the trainer's own
#   validation scores (`--no-ema`: the raw weights), loaded from any layout's checkpoint;
# Results print as a table, optionally go to a JSON file, and are logged under the same names (one name
# per quantity) to the run's MLflow record (the run dir's `mlflow_run_id`) when the run was tracked.

EVAL_SAMPLE_SEED = 20_011


def load_model(checkpoint, device: torch.device | str = "cpu", ema: bool | None = None):
    """(model in eval mode, its Config, the dataset info, the loader's info: checkpoint, step, ema, ...)
    of a checkpoint or run directory, any layout, loaded by `pretrain.checkpoint.load_model_for_inference`
    (the moving average of the weights when the run kept one, unless `ema` is False); the dataset info
    (tokenizer, special ids, splits) is the run's shards', built again when they are gone."""
    model, meta = load_model_for_inference(checkpoint, device=device, ema=ema)
    cfg = meta["config"]
    info = ensure_shards(cfg.data, progress=False)
    if info.vocab_size != meta["vocab_size"]:
        raise CheckpointError(f"{meta['checkpoint']}: the model has {meta['vocab_size']} tokens, the shards of "
                              f"{cfg.data.source} {info.vocab_size}: they were rebuilt with another tokenizer")
    return model, cfg, info, meta


def _prompt_batch(prompts: list[list[int]], answer_lens: list[int], info, seq_len: int):
    """(x, gen_mask, key_padding_mask): [BOS] prompt <answer: to generate> [EOS] PAD..."""
    B = len(prompts)
    x = torch.full((B, seq_len), info.pad_id, dtype=torch.long)
    gen = torch.zeros(B, seq_len, dtype=torch.bool)
    for i, (p, n) in enumerate(zip(prompts, answer_lens, strict=True)):
        row = [info.bos_id, *p]
        if len(row) + n + 1 > seq_len:
            raise ValueError(f"prompt ({len(p)}) + answer ({n}) + BOS/EOS do not fit data.seq_len = {seq_len}")
        x[i, : len(row)] = torch.tensor(row)
        gen[i, len(row) : len(row) + n] = True
        x[i, len(row) + n] = info.eos_id
    real = torch.zeros(B, seq_len, dtype=torch.bool)
    for i, (p, n) in enumerate(zip(prompts, answer_lens, strict=True)):
        real[i, : len(p) + n + 2] = True
    return x, gen, real


@torch.no_grad()
def task_metrics(model, cfg, info, sampler_cfg, num_samples: int = 256, batch_size: int = 64,
                 device: torch.device | str = "cpu", return_samples: int = 0):
    """Decode the answers of the first `num_samples` validation examples and score them: the task's
    metrics (mean over examples) prefixed `task/`, plus task/nfe (forwards per batch). With
    return_samples > 0 also returns [(prompt, generated, reference)] of the first ones."""
    task = get_task(cfg.data.source.removeprefix("task:"))
    on_response = trains_on_response(cfg.data)
    tok = info.tokenizer
    n = min(num_samples, cfg.data.task.num_val)
    examples = list(task.examples("val", n, cfg.data.task.seed, cfg.data.task))
    scores, shown, nfe = [], [], []
    for start in range(0, n, batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tok.encode(e.prompt) for e in chunk]
        lens = [len(tok.encode(e.answer)) for e in chunk]
        x, gen, real = _prompt_batch(prompts, lens, info, cfg.data.seq_len)
        # a model trained on responses sees `[BOS] prompt` as its clean prompt, as in training
        prompt = (torch.arange(x.shape[1])[None, :] <= torch.tensor([len(p) for p in prompts])[:, None]
                  if on_response else None)
        out = generate(model, x.to(device), gen.to(device), real.to(device), mask_id=info.mask_id, cfg=sampler_cfg,
                       forbid_ids=(info.pad_id, info.bos_id, info.eos_id), schedule=build_schedule(cfg.diffusion.schedule),
                       prompt_mask=prompt)
        nfe.append(out.nfe)
        tokens = out.tokens.cpu()
        for i, e in enumerate(chunk):
            text = tok.decode(tokens[i][gen[i]].tolist())
            scores.append(task.score(e, text))
            if len(shown) < return_samples:
                shown.append((e.prompt, text, e.answer))
    metrics = {f"task/{k}": v for k, v in task.aggregate(scores).items()}
    metrics["task/nfe"] = float(sum(nfe) / max(len(nfe), 1))
    metrics["task/examples"] = float(n)
    return (metrics, shown) if return_samples else metrics


@torch.no_grad()
def language_metrics(model, cfg, info, sampler_cfg, num_samples: int = 64, batch_size: int = 16,
                     device: torch.device | str = "cpu", reference=None):
    """Unconditional samples: gen/unigram_entropy, and gen/ppl + gen/nll under `reference` (an AR
    model on the same tokenizer) when given. Draws in float64 unless sampler_cfg.float64 is off."""
    import dataclasses

    L = cfg.data.seq_len
    nll = count = 0.0
    ents = []
    for b, start in enumerate(range(0, num_samples, batch_size)):
        B = min(batch_size, num_samples - start)
        x = torch.full((B, L), info.pad_id, dtype=torch.long)
        x[:, 0] = info.bos_id
        gen = torch.ones(B, L, dtype=torch.bool)
        gen[:, 0] = False
        scfg = dataclasses.replace(sampler_cfg, seed=sampler_cfg.seed + b)
        out = generate(model, x.to(device), gen.to(device), None, mask_id=info.mask_id, cfg=scfg,
                       forbid_ids=(info.pad_id, info.bos_id), schedule=build_schedule(cfg.diffusion.schedule))
        lengths = sample_lengths(out.tokens, info.eos_id)
        ents.append(unigram_entropy(out.tokens, lengths) * B)
        if reference is not None:
            s, c = generative_nll(reference, out.tokens.to(next(reference.parameters()).device), lengths)
            nll, count = nll + s, count + c
    metrics = {"gen/unigram_entropy": sum(ents) / num_samples, "gen/samples": float(num_samples),
               "gen/float64": float(sampler_cfg.float64)}
    if reference is not None and count:
        metrics["gen/nll"] = nll / count
        metrics["gen/ppl"] = math.exp(min(nll / count, 50.0))
    return metrics


def load_reference(reference: str, info, device: torch.device | str = "cpu", ema: bool | None = None):
    """The AR reference model scoring generative perplexity: a checkpoint (dir or model.pt) or a run
    dir of this framework. Refused up front (before any sampling) unless it is an `ar` model on the
    same vocabulary as the evaluated run: its likelihoods of other token ids would mean nothing."""
    path = resolve_checkpoint(reference)
    ref, ref_cfg, ref_info, _ = load_model(path, device, ema=ema)
    if ref_cfg.model.variant != "ar":
        raise ConfigError(f"--reference-ar {path} is a {ref_cfg.model.variant!r} model; generative perplexity "
                          f"needs an autoregressive reference (a run trained with model.variant=ar)")
    if ref_info.vocab_size != info.vocab_size or ref_info.tokenizer.fingerprint != info.tokenizer.fingerprint:
        raise ConfigError(f"--reference-ar {path} has another vocabulary ({ref_info.vocab_size} tokens, tokenizer "
                          f"{ref_info.tokenizer.fingerprint}) than the evaluated run ({info.vocab_size} tokens, "
                          f"{info.tokenizer.fingerprint}): generative perplexity would not compare; train the "
                          f"reference on the same data.tokenizer")
    return ref


def tracking_client(run_dir):
    """(MlflowClient, run id) of a tracked run directory (`mlflow_run.json` + `mlflow_run_id`, written
    by the trainer's tracker), or None when the run was not tracked."""
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    if not (run_dir / RUN_ID_FILE).is_file() or not (run_dir / RUN_INFO_FILE).is_file():
        return None
    uri = json.loads((run_dir / RUN_INFO_FILE).read_text())["uri"]
    # a relative sqlite path is relative to where the run was launched; from elsewhere MLflow would
    # silently create an empty store and then not find the run
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"the run's MLflow store {uri} is not found from {Path.cwd()}: evaluate from the "
                                f"directory the run was launched from (or pass --no-mlflow)")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri), (run_dir / RUN_ID_FILE).read_text().strip()


def log_to_mlflow(run_dir, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None) -> bool:
    """Add the metrics under their own names (val/nll, task/cell_acc, gen/ppl, zeroshot/<name>/nll: one
    name per quantity, whoever measured it; non-finite values are left out) and tags (eval.*: how this
    evaluation was made) to the run's MLflow record at `step`; False when the run is not tracked."""
    import time

    tracked = tracking_client(run_dir)
    if tracked is None:
        return False
    from mlflow.entities import Metric

    client, run_id = tracked
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                      for k, v in metrics.items() if math.isfinite(float(v))])
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    return True


def zero_shot_data_config(cfg, source: str):
    """The run's data config pointed at another corpus: the run's tokenizer (the very files its shards
    hold), packing and sequence length; shards under the default directory for that source and
    tokenizer (built once, reused after). Local files: held out half and half, both halves scored
    (the whole file); Hugging Face datasets: their data.val_split (default `test`, MDLM's choice)."""
    import dataclasses
    from pathlib import Path

    d = cfg.data
    spec = d.tokenizer
    if spec == "task":
        raise ConfigError(f"--data: this run's tokenizer is the task's own ({d.source}): it has no words to read "
                          "another corpus with; zero-shot NLL needs a sentencepiece or hf:NAME run")
    vocab_size = d.vocab_size
    if spec == "sentencepiece" or spec.startswith("sentencepiece:"):
        shard_dir = resolve_shard_dir(d)
        if not (shard_dir / TOKENIZER_FILE).is_file():
            raise ConfigError(f"--data: the run's tokenizer is not at {shard_dir} (the shards were moved or deleted); "
                              "rebuild them with python -m data_pipeline.build --config the run's config.yaml")
        import json

        meta = json.loads((shard_dir / TOKENIZER_FILE).read_text())
        spec = f"sentencepiece:{(shard_dir / meta['model_file']).resolve()}"
        vocab_size = load_tokenizer(shard_dir).vocab_size
    local = not source.startswith(("hf:", "task:"))
    if local:
        source = ",".join(str(Path(p.strip()).expanduser().resolve()) for p in source.split(",") if p.strip())
    return dataclasses.replace(d, source=source, tokenizer=spec, vocab_size=vocab_size, shard_dir="", mixture=[],
                               density=DensityConfig(), train_on="all", val_fraction=0.5 if local else d.val_fraction)


def zero_shot_nll(model, cfg, source: str, device, batch_size: int = 32, max_batches: int = 0) -> dict[str, float]:
    """NLL/PPL of the run's model on another corpus (MDLM's zero-shot table): the uniform-t NELBO for
    diffusion models, exact for `ar` (the same bound as val/nll), keys `zeroshot/<name>/{nll,ppl,tokens}`."""
    import dataclasses
    import re

    dcfg = zero_shot_data_config(cfg, source)
    info = ensure_shards(dcfg, progress=False)
    if info.vocab_size != model.vocab_size:
        raise TokenizerError(f"--data {source}: its shards were tokenized with {info.vocab_size} tokens, the model "
                             f"has {model.vocab_size}; delete {info.shard_dir} and rerun")
    objective = objective_for(cfg, info.mask_id)
    splits = [info] if source.startswith("hf:") else [info, dataclasses.replace(info, val_dir=info.train_dir)]
    total = count = 0.0
    for part in splits:
        loader = make_val_loader(dcfg, part, batch_size=batch_size)
        r = validation_nll(model, objective, loader, device, seed=cfg.seed, max_batches=max_batches)
        total += r["val/nll"] * r["val/tokens"]
        count += r["val/tokens"]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.removeprefix("hf:").rsplit("/", 1)[-1].rsplit(".", 1)[0]) or "data"
    nll = total / count
    return {f"zeroshot/{name}/nll": nll, f"zeroshot/{name}/ppl": math.exp(min(nll, 50.0)),
            f"zeroshot/{name}/tokens": float(count)}


def format_table(rows: dict[str, float]) -> str:
    """The metrics as an aligned two-column table with a header."""
    width = max([len(k) for k in rows] + [len("metric")])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    return "\n".join(lines + [f"{k:<{width}}  {v:.6g}" for k, v in rows.items()])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import logging
    import sys
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate",
                                description="Evaluate a trained run: validation NLL, task metrics or sample quality.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its latest checkpoint is evaluated)")
    src.add_argument("--checkpoint", help="a checkpoint directory (checkpoints/step_*, any layout) or a file in it")
    p.add_argument("--sampler", default="auto", choices=SAMPLERS, help="decoding (auto = the variant's own)")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (per block for block/semi-AR; 0 = one token per step)")
    p.add_argument("--tokens-per-step", type=int, default=0, help="tokens revealed per step (instead of --steps)")
    p.add_argument("--block-size", type=int, default=0, help="semi-AR block size for the masked-diffusion samplers")
    p.add_argument("--inner", default="confidence", help="block variant: the sampler inside a block")
    p.add_argument("--jigsaw-order", default="entropy", choices=JIGSAW_ORDERS, help="jigsaw: block order")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default for tasks); language runs default to 1")
    p.add_argument("--top-k", type=int, default=0, help="top-k filtering (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filtering (1 = off)")
    p.add_argument("--fp32-sampling", action="store_true", help="categorical draws in float32 (default float64)")
    p.add_argument("--num-samples", type=int, default=256, help="validation prompts (tasks) or samples (language); 0 = language runs skip sampling")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per sampler batch")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="do not reuse the committed prefix's keys/values (ar, block); same samples, slower")
    p.add_argument("--reference-ar", help="AR run dir or checkpoint (dir or model.pt) of this framework on the same "
                                          "tokenizer, scoring language samples (gen/ppl)")
    p.add_argument("--eval-batches", type=int, default=0, help="validation batches for val/nll (0 = all; -1 = skip)")
    p.add_argument("--data", metavar="FILE_OR_HF_NAME",
                   help="zero-shot NLL/PPL on another corpus (a local file/directory, or hf:NAME[/CONFIG]), with the "
                        "run's tokenizer and packing; its shards are built once under data/shards and reused. "
                        "Only this is computed (no sampling, no val/nll)")
    p.add_argument("--no-ema", action="store_true",
                   help="the raw weights, not their moving average (train.ema; the default when the run kept one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--show", type=int, default=3, help="print this many decoded examples")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow record")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        device = resolve_device(args.device, "--device")
        ema = False if args.no_ema else None
        model, cfg, info, meta = load_model(args.run or args.checkpoint, device, ema=ema)
        path = meta["checkpoint"]
        run_dir = run_dir_of(path)
        is_task = cfg.data.source.startswith("task:")
        temperature = args.temperature if args.temperature is not None else (0.0 if is_task else 1.0)
        scfg = SamplerConfig(name=args.sampler, steps=args.steps, tokens_per_step=args.tokens_per_step,
                             temperature=temperature, top_k=args.top_k, top_p=args.top_p, block_size=args.block_size,
                             inner=args.inner, jigsaw_order=args.jigsaw_order, float64=not args.fp32_sampling,
                             seed=args.seed, kv_cache=not args.no_kv_cache)
        sampler_name = resolve_sampler(cfg.model.variant, args.sampler)
        if args.reference_ar and is_task:
            raise ConfigError("--reference-ar scores unconditional language samples; this is a task run "
                              f"({cfg.data.source}), scored by the task's own metrics")
        # the reference is loaded and checked before any evaluation work
        ref = load_reference(args.reference_ar, info, device, ema=ema) if args.reference_ar else None
        metrics: dict[str, float] = {}
        step = meta["step"]
        if args.data:
            metrics.update(zero_shot_nll(model, cfg, args.data, device, batch_size=min(cfg.train.batch_size, 64),
                                         max_batches=max(args.eval_batches, 0)))
        elif args.eval_batches >= 0:
            objective = objective_for(cfg, info.mask_id)
            loader = make_val_loader(cfg.data, info, batch_size=min(cfg.train.batch_size, 64))
            metrics.update(validation_nll(model, objective, loader, device, seed=cfg.seed, max_batches=args.eval_batches))
        shown = []
        if args.data:
            pass  # the zero-shot NLL alone
        elif is_task:
            m, shown = task_metrics(model, cfg, info, scfg, args.num_samples, args.batch_size, device,
                                    return_samples=max(args.show, 0) or 1)
            metrics.update(m)
        elif args.num_samples > 0:  # 0: the validation NLL alone (no sampling)
            metrics.update(language_metrics(model, cfg, info, scfg, args.num_samples, args.batch_size, device, ref))
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError, DataSourceUnavailable) as e:
        # ValueError: also DataSourceError, TokenizerError, ShardFormatError (bad --data)
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = (f"# {path}  {'EMA' if meta['ema'] else 'raw'} weights variant={cfg.model.variant} "
              f"sampler={sampler_name} steps={scfg.steps} "
              f"T={scfg.temperature} float64={scfg.float64} device={device.type} seed={scfg.seed}")
    print(header)
    for prompt, text, ref_text in shown[: args.show]:
        print(f"  prompt {prompt[-40:]!r}\n    got  {text!r}\n    want {ref_text!r}")
    print(format_table(metrics))
    record = {"checkpoint": str(path), "ema": meta["ema"], "variant": cfg.model.variant, "sampler": sampler_name,
              "steps": scfg.steps, "temperature": scfg.temperature, "float64": scfg.float64, "device": device.type, "seed": scfg.seed,
              "metrics": metrics}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if run_dir is not None and not args.no_mlflow:
        try:
            tags = {"eval.sampler": sampler_name, "eval.steps": str(scfg.steps), "eval.temperature": str(scfg.temperature),
                    "eval.float64": str(scfg.float64), "eval.device": device.type, "eval.seed": str(scfg.seed),
                    "eval.ema": str(meta["ema"]), "eval.dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
            if args.reference_ar:
                tags["eval.reference_ar"] = str(args.reference_ar)
            if log_to_mlflow(run_dir, metrics, step, tags=tags):
                print(f"logged to the MLflow run of {run_dir} (step {step}; tags eval.*)")
            else:
                print(f"{run_dir} was not tracked (no mlflow_run_id): nothing logged to MLflow")
        except Exception as e:  # tracking must not lose the printed result
            print(f"warning: MLflow logging failed ({type(e).__name__}: {e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
