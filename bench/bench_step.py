"""Training-step time: the framework's step versus a bare PyTorch loop on the same model and batch.

Framework step = what `Trainer.train_step` runs: `step_rng` -> `objective.training_loss` (time
sampler, masking policy, ELBO weights, per-t-bucket stats) -> finite check -> backward ->
`clip_grad_norm_` -> AdamW step (param groups from `pretrain.train.param_groups`) -> zero_grad.
Bare step = the floor written here by hand: t = torch.rand, mask = torch.rand < t, F.cross_entropy
on the masked tokens weighted by 1/t, backward, the same clipping, the same AdamW step. Both use
the same model object, batch and optimizer settings; measurements are interleaved (warmup, then
alternating framework/bare repeats, order swapped each repeat) and the median is reported.

    python bench/bench_step.py            # CPU: quickstart size and a larger one; CUDA: + MDLM-small
    python bench/bench_step.py --quick    # a few repeats of the quickstart size only (smoke run)

Writes bench/results/bench_step.json. MFU (CUDA only) uses model.flops_per_token and
pretrain.throughput.device_peak_flops, the formula and peaks the trainer logs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import DiffusionConfig, load_config  # noqa: E402
from pretrain.diffusion import step_rng  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.throughput import device_peak_flops  # noqa: E402
from pretrain.train import param_groups  # noqa: E402
from pretrain.variants import build_objective  # noqa: E402


@dataclasses.dataclass
class Size:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    seq_len: int
    batch: int
    vocab: int
    real_len: int  # real tokens per sequence; the rest is padding (as in the quickstart's Sudoku)
    device: str = "cpu"
    dtype: str = "fp32"


def quickstart_size() -> Size:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    m = cfg.model
    # Sudoku: [BOS] 81 cells '=' 81 cells [EOS] = 165 real tokens padded to 168; 12 symbols + 4 specials
    return Size("quickstart", m.n_layers, m.d_model, m.n_heads, cfg.data.seq_len, cfg.train.batch_size, 16, 165)


SIZES = {
    "quickstart": quickstart_size,
    "cpu-large": lambda: Size("cpu-large", 4, 256, 4, 512, 8, 4096, 512),
    "mdlm-small": lambda: Size("mdlm-small", 12, 768, 12, 128, 64, 30522, 128, "cuda", "bf16"),
}


def make_batch(size: Size, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, size.vocab - 1, (size.batch, size.seq_len), generator=g)
    real = torch.zeros(size.batch, size.seq_len, dtype=torch.bool)
    real[:, : size.real_len] = True
    return {"input_ids": ids.to(device), "loss_mask": real.to(device)}


def build(size: Size, variant: str, device: torch.device):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.variant={variant}", f"model.n_layers={size.n_layers}", f"model.d_model={size.d_model}",
        f"model.n_heads={size.n_heads}", f"data.seq_len={size.seq_len}",
    ])
    torch.manual_seed(0)
    model = build_model(cfg.model, size.vocab, size.seq_len).to(device)
    objective = build_objective(cfg.diffusion, variant, mask_id=size.vocab - 1)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                            fused=device.type == "cuda")
    return model, objective, opt, cfg


def framework_step(model, objective, opt, batch, step: int, autocast, grad_clip: float) -> float:
    """Trainer.train_step, line for line (pretrain/train.py)."""
    rng = step_rng(0, step)
    with autocast:
        loss, stats = objective.training_loss(model, batch, rng)
    if not torch.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        return float("nan")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    stats = {**stats.to_dict(), "grad_norm": float(grad_norm)}  # as the trainer's step statistics
    return stats["loss"]


def bare_step(model, opt, batch, mask_id: int, autocast, grad_clip: float) -> float:
    """The floor: uniform t, Bernoulli(t) masking, 1/t-weighted CE on masked real tokens."""
    ids, real = batch["input_ids"], batch["loss_mask"]
    B = ids.shape[0]
    t = torch.rand(B, device=ids.device) * (1 - 1e-3) + 1e-3
    masked = (torch.rand(ids.shape, device=ids.device) < t[:, None]) & real
    x_t = torch.where(masked, mask_id, ids)
    with autocast:
        logits = model(x_t, t, key_padding_mask=real)
    rows = masked.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows].float(), ids[rows], reduction="none")
    loss = (ce / t[rows[0]]).sum() / real.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_size(size: Size, variant: str, warmup: int, repeats: int) -> dict:
    device = torch.device(size.device)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if size.dtype == "bf16"
                else contextlib.nullcontext())
    model, objective, opt, cfg = build(size, variant, device)
    batch = make_batch(size, device)
    clip = cfg.train.grad_clip or float("inf")
    step = [0]

    def fw():
        framework_step(model, objective, opt, batch, step[0], autocast, clip)
        step[0] += 1

    def bare():
        bare_step(model, opt, batch, size.vocab - 1, autocast, clip)

    for _ in range(warmup):
        fw()
        bare()
    fw_s, bare_s = [], []
    for r in range(repeats):
        pair = ((fw, fw_s), (bare, bare_s)) if r % 2 == 0 else ((bare, bare_s), (fw, fw_s))
        for fn, out in pair:
            out.append(timed(fn, device))
    fw_med, bare_med = statistics.median(fw_s), statistics.median(bare_s)
    tokens = size.batch * size.seq_len
    peak = device_peak_flops(device, size.dtype)
    fpt = model.flops_per_token(size.seq_len)
    row = {
        **dataclasses.asdict(size), "variant": variant, "repeats": repeats, "warmup": warmup,
        "framework_ms": 1e3 * fw_med, "bare_ms": 1e3 * bare_med, "ratio": fw_med / bare_med,
        "framework_tokens_per_s": tokens / fw_med, "bare_tokens_per_s": tokens / bare_med,
        "framework_ms_all": [1e3 * s for s in fw_s], "bare_ms_all": [1e3 * s for s in bare_s],
        "flops_per_token": fpt, "parameters": model.num_parameters(),
    }
    if peak:
        row["framework_mfu"] = fpt * tokens / fw_med / peak
        row["bare_mfu"] = fpt * tokens / bare_med / peak
    return row


def print_table(rows: list[dict]) -> None:
    head = ["size", "device", "L", "batch", "framework ms", "bare ms", "ratio", "fw tok/s", "MFU fw/bare"]
    lines = []
    for r in rows:
        mfu = f"{r['framework_mfu']:.1%}/{r['bare_mfu']:.1%}" if "framework_mfu" in r else "-"
        lines.append([r["name"], f"{r['device']} {r['dtype']}", str(r["seq_len"]), str(r["batch"]),
                      f"{r['framework_ms']:.1f}", f"{r['bare_ms']:.1f}", f"{r['ratio']:.3f}x",
                      f"{r['framework_tokens_per_s']:.0f}", mfu])
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="training step: framework vs bare PyTorch (median; goal ratio <= 1.10x)")
        for h in head:
            table.add_column(h, justify="right")
        for line in lines:
            table.add_row(*line)
        Console(width=140).print(table)
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
        for line in lines:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None,
                   help="sizes to run (default: quickstart and cpu-large, plus mdlm-small when CUDA is present)")
    p.add_argument("--variant", default="mdm", help="model.variant of both loops' model (default: mdm)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first (default 2)")
    p.add_argument("--repeats", type=int, default=11, help="timed steps of each loop, interleaved (default 11)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: quickstart size only, 1 warmup, 4 repeats")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_step.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes, args.warmup, args.repeats = args.sizes or ["quickstart"], 1, 4
    else:
        sizes = args.sizes or ["quickstart", "cpu-large"] + (["mdlm-small"] if torch.cuda.is_available() else [])
    rows = []
    for name in sizes:
        size = SIZES[name]()
        if size.device == "cuda" and not torch.cuda.is_available():
            print(f"skipping {name}: no CUDA device", file=sys.stderr)
            continue
        rows.append(run_size(size, args.variant, args.warmup, args.repeats))
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "diffusion": dataclasses.asdict(DiffusionConfig())}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
