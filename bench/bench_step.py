"""Training-step time: the real `Trainer.train_step` against a bare PyTorch loop on the same model
and the same micro-batches (issue 18, Benchmarks). Goal: ratio <= 1.05x on CPU; on a GPU, MFU.

Framework step = `Trainer.train_step(micro_batches)` of a Trainer built from a recipe exactly as the
launcher builds it (single process): per micro-batch the objective's `training_loss` (time sampler,
masking, ELBO weights, t-bucket stats), the data-parallel totals (`_global_totals`, a no-op
collective at world size 1 but its host syncs are real), the loss rescale, the engine's backward
and accumulation-aware step (clipping, AdamW), then the LR scheduler. Only public methods are used:
the Trainer is constructed, `train_step` is called.
Bare step = the floor written here by hand on the same model object (`trainer.engine.module`)
and micro-batches: t = torch.rand, mask = rand < t on real tokens, 1/t-weighted cross-entropy on the
masked tokens, backward per micro-batch (scaled 1/accumulation), the same clipping, a plain AdamW
step (fused on CUDA, as the trainer's), zero_grad. Measurements are interleaved (warmup, then
alternating framework/bare repeats, order swapped every repeat); medians are reported, so both see
the same machine load (the ratio is only meaningful within one run).

    python bench/bench_step.py                 # CPU: quickstart and mdlm-small (batch 8); CUDA: + 350m
    python bench/bench_step.py --quick         # smoke run: quickstart, 1 warmup, 4 repeats
    python bench/bench_step.py --sizes mdlm-small 350m --dtype bf16    # the GPU check's MFU rows

Sizes: quickstart = configs/quickstart.yaml as is (Sudoku, fp32 on CPU). mdlm-small = the
configs/lm1b_bell.yaml model (12 x 768, 12 heads, L = 128, packing pad, dropout 0.1) on a synthetic
corpus written here (random words, 20-120 per line, like LM1B's short sentences, so rows are padded)
with a word-level tokenizer of exactly bert-base-uncased's 30,522 entries (BERT's special names), so
shapes, the head's cost and the padding are the recipe's without network access. 350m = the same
recipe at 24 x 1024, 16 heads (~3.6e8 parameters with the 30,522 vocabulary). EMA is off in both
loops (it updates after the step in `fit`, outside train_step). MFU = flops_per_token x tokens /
step time / the device's peak (pretrain.throughput, the numbers the trainer logs); tokens count
every position, padding included (the compute the kernels do).

Writes bench/results/bench_step.json: {"meta": {...}, "results": [one row per size]}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parallel.topology import Topology  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.train import Trainer  # noqa: E402

BERT_VOCAB = 30522
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# name: (recipe, overrides, global batch, micro-batch, default device)
SIZES = {
    "quickstart": ("quickstart.yaml", [], 32, 32, "cpu"),
    "mdlm-small": ("lm1b_bell.yaml", [], 8, 8, "cpu"),
    "350m": ("lm1b_bell.yaml", ["model.n_layers=24", "model.d_model=1024", "model.n_heads=16"], 32, 32, "cuda"),
}
GPU_BATCH = {"quickstart": (32, 32), "mdlm-small": (64, 64), "350m": (32, 32)}  # MDLM: 512 over 8 GPUs


def synthetic_corpus(root: Path, n_lines: int = 4000, seed: int = 0) -> tuple[Path, Path]:
    """A text file of random-word sentences and a word-level tokenizer.json with 30,522 entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(BERT_VOCAB - len(BERT_SPECIALS))]
    vocab = {w: i for i, w in enumerate(BERT_SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    rng = random.Random(seed)
    text = root / "corpus.txt"
    with text.open("w") as f:
        for _ in range(n_lines):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + "\n")
    return text, tok_path


def build_trainer(name: str, device: str, dtype: str, work: Path, accumulation: int,
                  extra: list[str] | None = None) -> Trainer:
    recipe, over, batch, micro, _ = SIZES[name]
    if device == "cuda":
        batch, micro = GPU_BATCH[name]
    micro = max(batch // accumulation, 1)
    sets = [*over, f"train.batch_size={micro * accumulation}", f"train.micro_batch_size={micro}",
            f"train.device={device}", f"train.dtype={dtype}", "train.ema=0", "tracking.enabled=false",
            "launch.resume=false", "train.steps=1000", "train.warmup_steps=10", f"data.shard_dir={work / 'shards'}"]
    if recipe != "quickstart.yaml":
        text, tok = synthetic_corpus(work)
        sets += [f"data.source={text}", f"data.tokenizer=hf:{tok}", "diffusion.time_sampler=uniform"]
    cfg = load_config(ROOT / "configs" / recipe, [*sets, *(extra or [])])
    run_dir = work / "run"
    run_dir.mkdir(exist_ok=True)
    return Trainer(cfg, run_dir, Topology(), [])


def bare_step(model, opt, micro_batches, mask_id: int, autocast, clip: float) -> None:
    """The floor: uniform t, Bernoulli(t) masking of real tokens, 1/t-weighted CE, AdamW."""
    n = len(micro_batches)
    for batch in micro_batches:
        ids, real = batch["input_ids"], batch["loss_mask"].bool()
        t = torch.rand(ids.shape[0], device=ids.device) * (1 - 1e-3) + 1e-3
        masked = (torch.rand(ids.shape, device=ids.device) < t[:, None]) & real
        x_t = torch.where(masked, mask_id, ids)
        with autocast:
            logits = model(x_t, t, key_padding_mask=real)
        ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
        loss = (ce * masked / t[:, None]).sum() / real.sum().clamp(min=1)
        (loss / n).backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_size(name: str, device: str, dtype: str, warmup: int, repeats: int, accumulation: int,
             extra: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench_step_{name}_") as tmp:
        trainer = build_trainer(name, device, dtype, Path(tmp), accumulation, extra)
        dev = trainer.device
        micro = []
        for batch in trainer.train_loader:
            micro.append({k: v.to(dev) for k, v in batch.items()})
            if len(micro) == trainer.accumulation:
                break
        model = trainer.engine.module
        t = trainer.cfg.train
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), fused=dev.type == "cuda")
        autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if trainer.dtype == "bf16"
                    else contextlib.nullcontext())
        mask_id = trainer.data.mask_id

        def fw():
            trainer.train_step(micro)

        def bare():
            bare_step(model, opt, micro, mask_id, autocast, t.grad_clip)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fw()
            bare()
        fw_s, bare_s = [], []
        for r in range(repeats):
            pair = ((fw, fw_s), (bare, bare_s)) if r % 2 == 0 else ((bare, bare_s), (fw, fw_s))
            for fn, out in pair:
                out.append(timed(fn, dev))
        fw_med, bare_med = statistics.median(fw_s), statistics.median(bare_s)
        tokens = sum(b["input_ids"].numel() for b in micro)
        real = sum(int(b["loss_mask"].sum()) for b in micro)
        m = trainer.cfg.model
        row = {
            "name": name, "overrides": list(extra or []), "device": dev.type, "dtype": trainer.dtype, "n_layers": m.n_layers, "d_model": m.d_model,
            "n_heads": m.n_heads, "seq_len": trainer.cfg.data.seq_len, "batch": trainer.cfg.train.batch_size,
            "accumulation": trainer.accumulation, "vocab": trainer.data.vocab_size, "parameters": trainer.n_params,
            "tokens_per_step": tokens, "real_tokens_per_step": real, "repeats": repeats, "warmup": warmup,
            "framework_ms": 1e3 * fw_med, "bare_ms": 1e3 * bare_med, "ratio": fw_med / bare_med,
            "framework_tokens_per_s": tokens / fw_med, "bare_tokens_per_s": tokens / bare_med,
            "framework_ms_all": [1e3 * s for s in fw_s], "bare_ms_all": [1e3 * s for s in bare_s],
            "flops_per_token": trainer.flops_per_token,
            "attention_kernel": getattr(model, "attention_kernel", ""),
        }
        if trainer.peak_flops:
            row["peak_flops"] = trainer.peak_flops
            row["framework_mfu"] = trainer.flops_per_token * tokens / fw_med / trainer.peak_flops
            row["bare_mfu"] = trainer.flops_per_token * tokens / bare_med / trainer.peak_flops
        if dev.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return row


def print_table(rows: list[dict]) -> None:
    head = ["size", "device", "params", "L x batch", "framework ms", "bare ms", "ratio", "fw tok/s",
            "MFU fw/bare", "peak GiB", "attention"]
    lines = []
    for r in rows:
        mfu = f"{r['framework_mfu']:.1%}/{r['bare_mfu']:.1%}" if "framework_mfu" in r else "-"
        lines.append([r["name"] + (" " + " ".join(r["overrides"]) if r["overrides"] else ""), f"{r['device']} {r['dtype']}", f"{r['parameters'] / 1e6:.1f}M",
                      f"{r['seq_len']}x{r['batch']}", f"{r['framework_ms']:.1f}", f"{r['bare_ms']:.1f}",
                      f"{r['ratio']:.3f}x", f"{r['framework_tokens_per_s']:.0f}", mfu,
                      f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "-", r["attention_kernel"]])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print("training step: Trainer.train_step vs bare PyTorch (median; goal ratio <= 1.05x)")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None,
                   help="default: quickstart and mdlm-small (+ 350m with CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when present (then bf16), else CPU (fp32)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed steps of each loop, interleaved (default 9)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="config overrides for every size, e.g. model.attention_dropout=0.1 (forces SDPA's dense mask)")
    p.add_argument("--quick", action="store_true", help="smoke run: quickstart only, 1 warmup, 4 repeats")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_step.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    dtype = ("bf16" if device == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    if args.quick:
        sizes, args.warmup, args.repeats = args.sizes or ["quickstart"], 1, 4
    else:
        sizes = args.sizes or ["quickstart", "mdlm-small"] + (["350m"] if device == "cuda" else [])
    rows = [run_size(n, device, dtype, args.warmup, args.repeats, args.accumulation, args.overrides)
            for n in sizes]
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
