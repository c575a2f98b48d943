"""Per-rank memory of parameters and optimizer state under ZeRO 0-3, and step time per layout.

Each layout runs the framework's own Trainer on real ranks (gloo on CPU, the same process groups,
DeepSpeed engine and tensor-parallel layers the launcher uses). Memory is measured, not computed:
after the last optimizer step (activations and gradients released) every live tensor of the rank is
counted once by its storage, then compared with the theoretical share for Adam in fp32 at that point
(12 bytes per parameter: 4 weight + 8 moments; ZeRO-1/2 shard the moments over the data-parallel
ranks, ZeRO-3 also the weights; tensor parallelism divides everything by tp; a pipeline stage
holds its own layers, so the theory uses the largest stage's parameter count). Engine buffers
(DeepSpeed's flat fp32 partitions and communication buckets) are what the ratio above 1 shows. Step time is the median over the measured steps, as a ratio to dp=1 in the same
run. On CPU all ranks share the machine's cores, so this shows overhead, not speedup.

    python bench/bench_parallel.py            # d_model 256, 4 layers, 30 steps per layout
    python bench/bench_parallel.py --quick    # smaller, 8 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYOUTS = {
    "dp1": dict(nproc=1, tp=1, zero=0),
    "dp2-zero0": dict(nproc=2, tp=1, zero=0),
    "dp2-zero1": dict(nproc=2, tp=1, zero=1),
    "dp2-zero2": dict(nproc=2, tp=1, zero=2),
    "dp2-zero3": dict(nproc=2, tp=1, zero=3),
    "tp2": dict(nproc=2, tp=2, zero=0),
    "pp2": dict(nproc=2, tp=1, zero=0, pp=2),
    "pp2-dp2-zero1": dict(nproc=4, tp=1, zero=1, pp=2),
}


def live_tensor_bytes() -> int:
    """Bytes of every live tensor storage in this process, each storage counted once."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # gc finds deprecated torch objects too
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and not obj.is_meta:
                storage = obj.untyped_storage()
                key = storage.data_ptr()
                if key and key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - objects that look like tensors but are not readable
            continue
    return total


def rank_main(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import logging

    logging.disable(logging.WARNING)
    from parallel.state import destroy, init_distributed
    from parallel.topology import Topology
    from pretrain.callbacks import Callback
    from pretrain.config import load_config
    from pretrain.train import Trainer

    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    distributed = world > 1 or cfg.parallel.zero_stage > 0
    topology = init_distributed("gloo", tp=cfg.parallel.tp, pp=cfg.parallel.pp) if distributed else Topology()
    step_times: list[float] = []

    class Timer(Callback):
        def on_step_end(self, trainer, metrics):
            step_times.append(metrics["train/step_time_s"])

    run_dir = Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    trainer = Trainer(cfg, run_dir, topology, [Timer()])
    baseline = live_tensor_bytes()  # before any optimizer state exists
    trainer.fit()
    total = live_tensor_bytes()
    local = sum(p.numel() for p in trainer.engine.module.parameters())  # this rank's (stage's / shard's) share
    result = {"rank": rank, "n_params": trainer.n_params, "local_params": local, "live_bytes": total,
              "live_bytes_before_fit": baseline,
              "step_s": statistics.median(step_times[2:] or step_times)}
    if distributed:
        import torch.distributed as dist

        results = [None] * world
        dist.all_gather_object(results, result)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
        destroy()
    else:
        Path(out).write_text(json.dumps([result]))


def run_layout(name: str, layout: dict, common: list[str], work: Path) -> list[dict]:
    overrides = [*common, f"launch.nproc={layout['nproc']}", f"parallel.tp={layout['tp']}",
                 f"parallel.pp={layout.get('pp', 1)}",
                 f"parallel.zero_stage={layout['zero']}", f"data.shard_dir={work / 'shards'}"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / f"{name}.json"
    mp.start_processes(rank_main, args=(layout["nproc"], port, overrides, str(out)), nprocs=layout["nproc"],
                       start_method="spawn", join=True)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller model and 8 steps (smoke run)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_parallel.json"))
    args = p.parse_args()
    d_model, layers, steps = (128, 2, 8) if args.quick else (256, 4, 30)
    common = [f"model.d_model={d_model}", f"model.n_layers={layers}", "model.n_heads=4", f"train.steps={steps}",
              f"train.eval_every={steps}", "train.eval_batches=1", "train.batch_size=16", "tracking.enabled=false",
              "data.task.num_train=512", "data.task.num_val=32", "train.device=cpu", "train.dtype=fp32"]
    from data_pipeline.build import ensure_shards
    from pretrain.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    ensure_shards(load_config(REPO / "configs" / "quickstart.yaml", [*common, f"data.shard_dir={work / 'shards'}"]).data)
    rows, base_step = [], None
    for name in args.layouts:
        results = run_layout(name, LAYOUTS[name], common, work)
        n_params = results[0]["n_params"]
        state = max(r["live_bytes"] for r in results)
        zero, nproc, tp = LAYOUTS[name]["zero"], LAYOUTS[name]["nproc"], LAYOUTS[name]["tp"]
        pp = LAYOUTS[name].get("pp", 1)
        dp = nproc // (tp * pp)
        weight, moments = (4 / dp if zero == 3 else 4), (8 / dp if zero >= 1 else 8)
        theory = n_params * (weight + moments) / tp
        if pp > 1:  # a stage holds its own layers: the largest stage is the rank that bounds memory
            theory = max(r["local_params"] for r in results) * (weight + moments)
        step = statistics.median(r["step_s"] for r in results)
        base_step = base_step or step
        rows.append({"layout": name, "ranks": nproc, "params": n_params, "measured_mb_per_rank": state / 2**20,
                     "theory_mb_per_rank": theory / 2**20, "measured_over_theory": state / theory,
                     "step_s": step, "step_vs_dp1": step / base_step})
    print(f"\nper-rank tensor memory after training (all live tensors after the last step: weights, Adam state, engine buffers)"
          f"\nmodel: {rows[0]['params']:,} parameters; theory = fp32 weights + Adam moments (12 B/param at dp1)\n")
    print(f"{'layout':<12}{'ranks':>6}{'measured MB':>13}{'theory MB':>11}{'meas/theory':>13}{'step s':>9}{'vs dp1':>8}")
    for r in rows:
        print(f"{r['layout']:<12}{r['ranks']:>6}{r['measured_mb_per_rank']:>13.1f}{r['theory_mb_per_rank']:>11.1f}"
              f"{r['measured_over_theory']:>13.2f}{r['step_s']:>9.3f}{r['step_vs_dp1']:>7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "device": "cpu", "cores": os.cpu_count()}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
