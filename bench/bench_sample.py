"""Decoding throughput with and without the clean-prefix KV cache (pretrain/model/kv_cache.py).

Per case (variant, sequence length, block size, denoising steps per block): unconditional decoding
of a batch ([BOS] + L - 1 generated tokens) by the variant's own sampler, uncached and cached,
interleaved round by round so machine noise hits both alike. Reported: generated tokens/s of each
(median over rounds), their ratio in the same run, the ratio of token positions run through the
model (the work the cache removes), and whether the two produced identical samples (they must).
Weights are random: throughput does not depend on them.

    python bench/bench_sample.py            # 3 rounds
    python bench/bench_sample.py --quick    # 1 round, smaller cases (smoke run)
    python bench/bench_sample.py --threads 1   # on a shared CPU: oversubscribed threads distort both
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common.device import resolve_device  # noqa: E402
from pretrain.config import ModelConfig  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.sample import SamplerConfig, generate  # noqa: E402

V, MASK, BOS = 512, 3, 1
# (variant, seq_len, block_size, steps per block; 0 = one token per step)
CASES = [("block", 128, 16, 4), ("block", 256, 16, 4), ("block", 256, 32, 8), ("ar", 128, 0, 0)]
QUICK_CASES = [("block", 64, 16, 4), ("ar", 64, 0, 0)]


def decode(model, batch: int, seq_len: int, steps: int, kv_cache: bool, device) -> tuple[float, object]:
    x = torch.full((batch, seq_len), MASK, dtype=torch.long, device=device)
    x[:, 0] = BOS
    gen = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    gen[:, 0] = False
    cfg = SamplerConfig(temperature=1.0, steps=steps, kv_cache=kv_cache, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, x, gen, mask_id=MASK, cfg=cfg, forbid_ids=(0, BOS))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--batch", type=int, default=4, help="sequences decoded together")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="1 round, smaller cases (smoke run)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_sample.json"))
    args = p.parse_args()
    device = resolve_device(args.device, "--device")
    rounds, cases = (1, QUICK_CASES) if args.quick else (args.rounds, CASES)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for variant, L, bs, steps in cases:
        torch.manual_seed(0)
        model = build_model(ModelConfig(variant=variant, n_layers=args.layers, d_model=args.d_model,
                                        n_heads=max(args.d_model // 64, 1), block_size=bs), V, L).to(device).eval()
        decode(model, args.batch, min(L, 2 * max(bs, 1) + 1), steps, True, device)  # warm-up
        times = {False: [], True: []}
        outs = {}
        for _ in range(rounds):
            for kv in (False, True):
                dt, outs[kv] = decode(model, args.batch, L, steps, kv, device)
                times[kv].append(dt)
        generated = args.batch * (L - 1)
        tps = {kv: generated / statistics.median(t) for kv, t in times.items()}
        row = {"variant": variant, "seq_len": L, "block_size": bs, "steps_per_block": steps, "batch": args.batch,
               "nfe": outs[True].nfe, "uncached_tok_s": tps[False], "cached_tok_s": tps[True],
               "speedup": tps[True] / tps[False],
               "positions_ratio": outs[False].positions / outs[True].positions,
               "same_samples": bool(torch.equal(outs[False].tokens, outs[True].tokens)),
               "uncached_s": times[False], "cached_s": times[True]}
        rows.append(row)
        print(f"  {variant} L={L} bs={bs}: {tps[False]:.0f} -> {tps[True]:.0f} tok/s", file=sys.stderr)

    header = (f"{'variant':<8}{'L':>5}{'block':>6}{'steps':>6}{'nfe':>6}{'uncached tok/s':>16}{'cached tok/s':>14}"
              f"{'speedup':>9}{'work ratio':>12}{'same':>6}")
    print(f"# device={device.type} threads={torch.get_num_threads()} batch={args.batch} layers={args.layers} "
          f"d_model={args.d_model} vocab={V} rounds={rounds} (median)")
    print(header)
    for r in rows:
        print(f"{r['variant']:<8}{r['seq_len']:>5}{r['block_size']:>6}{r['steps_per_block']:>6}{r['nfe']:>6}"
              f"{r['uncached_tok_s']:>16.0f}{r['cached_tok_s']:>14.0f}{r['speedup']:>8.2f}x"
              f"{r['positions_ratio']:>11.2f}x{'yes' if r['same_samples'] else 'NO':>6}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "python": platform.python_version(), "batch": args.batch, "layers": args.layers,
                               "d_model": args.d_model, "vocab": V, "rounds": rounds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["same_samples"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
