"""train.compile: eager vs torch.compile'd training steps on the char-level recipe's shape, and the
scaled-dot-product-attention kernel PyTorch picks on this device.

Step = what `Trainer.train_step` runs on one process: `step_rng` -> `objective.training_loss` ->
backward -> clip -> AdamW step, on `configs/repro/char_uniform.yaml`'s model and batch (random
character ids of its vocabulary; the step's cost does not depend on which). The compiled model is
`model.compile()` as the trainer does with train.compile=true. Both are timed in the same process,
interleaved (eager block, compiled block, order swapped each repeat), after warmup (the compiled
model's first steps are its compilation, reported separately).

Wall-clock tokens/s on a shared machine is mostly the load; the ratio of the two, measured
interleaved in one run, is the number to read. Process CPU time (all threads) per step is also
reported: tokens per CPU-second is less sensitive to other processes than tokens per wall-second.

    python bench/bench_compile.py                      # char_uniform (mdm) and char_ar shapes
    python bench/bench_compile.py --recipe configs/repro/char_uniform.yaml --repeats 3 --steps 5

Writes bench/results/bench_compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import load_config  # noqa: E402
from pretrain.diffusion import step_rng  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.train import build_optimizer  # noqa: E402
from pretrain.variants import build_objective  # noqa: E402


def sdpa_kernels(model: torch.nn.Module, batch: dict, objective) -> list[str]:
    """The aten attention ops a training forward/backward calls (which SDPA path was taken)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, _ = objective.training_loss(model, batch, step_rng(0, 0, 0, 1))
        loss.backward()
    model.zero_grad(set_to_none=True)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "attention" in n.lower() and n.startswith("aten::"))


class Runner:
    def __init__(self, cfg, compiled: bool, vocab: int, seed: int = 0):
        torch.manual_seed(seed)
        self.model = build_model(cfg.model, vocab, cfg.data.seq_len)
        if compiled:
            self.model.compile()
        self.objective = build_objective(cfg.diffusion, cfg.model.variant, mask_id=3)
        self.optimizer = build_optimizer(self.model, cfg.train, torch.device("cpu"))
        self.cfg = cfg
        self.step = 0

    def run(self, batch: dict, n: int) -> tuple[float, float]:
        """n steps; (wall seconds, process CPU seconds)."""
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            loss, _ = self.objective.training_loss(self.model, batch, step_rng(self.cfg.seed, self.step, 0, 1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        return time.perf_counter() - w0, time.process_time() - c0


def bench_recipe(recipe: Path, steps: int, repeats: int, batch_size: int | None) -> dict:
    cfg = load_config(recipe, [f"train.batch_size={batch_size}"] if batch_size else [])
    vocab = 127  # the char recipes' built vocabulary (4 specials + the corpora's characters)
    B, L = cfg.train.batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(4, vocab, (B, L), generator=g), "loss_mask": torch.ones(B, L, dtype=torch.bool)}
    eager, comp = Runner(cfg, False, vocab), Runner(cfg, True, vocab)
    kernels = sdpa_kernels(eager.model, batch, eager.objective)
    eager.run(batch, 2)  # warmup
    t0 = time.perf_counter()
    compile_wall, compile_cpu = comp.run(batch, 2)  # compilation (forward and backward graphs) + 2 steps
    print(f"  {recipe.stem}: compilation + 2 steps took {compile_wall:.1f} s wall ({compile_cpu:.1f} s CPU)", flush=True)
    kernels_compiled = sdpa_kernels(comp.model, batch, comp.objective)
    samples: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
    for r in range(repeats):
        order = (("eager", eager), ("compiled", comp)) if r % 2 == 0 else (("compiled", comp), ("eager", eager))
        for name, runner in order:
            samples[name].append(runner.run(batch, steps))
    tokens = B * L * steps
    out = {"recipe": str(recipe.relative_to(ROOT)), "variant": cfg.model.variant, "batch": B, "seq_len": L,
           "n_params": eager.model.num_parameters(), "steps_per_sample": steps, "repeats": repeats,
           "compile_wall_s": compile_wall, "compile_cpu_s": compile_cpu, "sdpa_ops_eager": kernels,
           "sdpa_ops_compiled": kernels_compiled, "bench_wall_s": time.perf_counter() - t0}
    for name, ss in samples.items():
        out[f"{name}_tok_per_s"] = tokens / statistics.median(w for w, _ in ss)
        out[f"{name}_tok_per_cpu_s"] = tokens / statistics.median(c for _, c in ss)
    out["speedup_wall"] = out["compiled_tok_per_s"] / out["eager_tok_per_s"]
    out["speedup_cpu"] = out["compiled_tok_per_cpu_s"] / out["eager_tok_per_cpu_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", type=Path, help="recipe(s) to take the shape from "
                   "(default: configs/repro/char_uniform.yaml and char_ar.yaml)")
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="interleaved eager/compiled blocks (median reported)")
    p.add_argument("--batch-size", type=int, help="override train.batch_size (default: the recipe's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_compile.json")
    args = p.parse_args(argv)
    recipes = [r.resolve() for r in args.recipe] if args.recipe else [
        ROOT / "configs/repro/char_uniform.yaml", ROOT / "configs/repro/char_ar.yaml"]
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    rows = [bench_recipe(r, args.steps, args.repeats, args.batch_size) for r in recipes]
    head = ("recipe", "variant", "params", "eager tok/s", "compiled tok/s", "speedup (wall)",
            "eager tok/CPU-s", "compiled tok/CPU-s", "speedup (CPU)", "compile s")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {Path(r['recipe']).stem} | {r['variant']} | {r['n_params'] / 1e6:.2f}M | {r['eager_tok_per_s']:,.0f} | "
              f"{r['compiled_tok_per_s']:,.0f} | {r['speedup_wall']:.2f}x | {r['eager_tok_per_cpu_s']:,.0f} | "
              f"{r['compiled_tok_per_cpu_s']:,.0f} | {r['speedup_cpu']:.2f}x | {r['compile_wall_s']:.0f} |")
    for r in rows:
        print(f"SDPA ops ({Path(r['recipe']).stem}): eager {', '.join(r['sdpa_ops_eager'])}; "
              f"compiled {', '.join(r['sdpa_ops_compiled'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
            "machine": platform.processor() or platform.machine()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
