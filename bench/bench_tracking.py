"""Training-time overhead of MLflow tracking: off vs a local sqlite store vs an HTTP server.

The quickstart model and data, its logging frequency (train.log_every), a fixed number of steps;
configurations are interleaved round by round so machine noise hits them alike, and each is
reported as a ratio to tracking off in the same round (median over rounds). Goal: < 2% overhead.

    python bench/bench_tracking.py            # 3 rounds x 120 steps
    python bench/bench_tracking.py --quick    # 1 round x 40 steps
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from parallel.topology import Topology  # noqa: E402
from pretrain.callbacks import TrackingCallback  # noqa: E402
from pretrain.config import flatten, load_config  # noqa: E402
from pretrain.tracking import MlflowTracker, prepare_store, start_local_server, stop_local_server  # noqa: E402
from pretrain.train import Trainer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_fit(cfg, work: Path, tag: str, uri: str | None) -> tuple[float, int]:
    run_dir = work / "runs" / tag
    run_dir.mkdir(parents=True)
    callbacks = []
    tracker = None
    if uri:
        tracker = MlflowTracker(uri, "bench-tracking", str(work / "artifacts"), run_dir, tag, flatten(cfg), {},
                                flush_interval=cfg.tracking.flush_interval_s)
        callbacks.append(TrackingCallback(tracker))
    trainer = Trainer(cfg, run_dir, Topology(), callbacks)
    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start
    return elapsed, (tracker.sender.sent_metrics if tracker else 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--steps", type=int, default=120, help="training steps per measured run")
    p.add_argument("--quick", action="store_true", help="1 round of 40 steps (smoke run)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_tracking.json"))
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 40

    work = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"train.steps={args.steps}", f"train.eval_every={args.steps}", "train.eval_batches=1",
        f"data.shard_dir={work / 'shards'}",
    ])
    sqlite_uri = f"sqlite:///{work / 'store.db'}"
    prepare_store(sqlite_uri)
    port = free_port()
    server = start_local_server(f"sqlite:///{work / 'server.db'}", work / "server_artifacts", port)
    http_uri = f"http://127.0.0.1:{port}"
    configs = {"off": None, "sqlite": sqlite_uri, "http": http_uri}
    times: dict[str, list[float]] = {k: [] for k in configs}
    sent: dict[str, int] = {}
    try:
        timed_fit(cfg, work, "warmup", None)  # shard build, allocator and thread pools warm
        for r in range(args.rounds):
            for name, uri in configs.items():
                elapsed, n = timed_fit(cfg, work, f"{name}-{r}", uri)
                times[name].append(elapsed)
                sent[name] = n
    finally:
        stop_local_server(server)

    rows = []
    for name in configs:
        ratios = [t / off for t, off in zip(times[name], times["off"], strict=True)]
        rows.append({
            "tracking": name, "median_s": statistics.median(times[name]),
            "per_step_ms": 1000 * statistics.median(times[name]) / args.steps,
            "ratio_vs_off": statistics.median(ratios), "metrics_sent_per_run": sent[name],
        })
    print(f"\nMLflow tracking overhead: quickstart model, {args.steps} steps, log_every={cfg.train.log_every}, "
          f"{args.rounds} interleaved round(s)\n")
    print(f"{'tracking':<10}{'run s':>10}{'ms/step':>10}{'vs off':>10}{'metrics sent':>14}")
    for row in rows:
        print(f"{row['tracking']:<10}{row['median_s']:>10.2f}{row['per_step_ms']:>10.1f}"
              f"{row['ratio_vs_off']:>9.3f}x{row['metrics_sent_per_run']:>14}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "log_every": cfg.train.log_every,
                               "rows": rows, "raw_seconds": times}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
