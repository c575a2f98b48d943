"""Seed 002 benchmark: density annotation throughput, and the effect of density-aware masking.

    python bench/bench_density.py [--steps S] [--docs N] [--no-model-run]

1. Throughput: tokens/s of bare tokenization (`encode_chunk`: sentencepiece + flattening) and of
   tokenization + each annotator (`encode_annotate_chunk`'s work) on in-memory documents of two shared
   corpora: WikiText-2 (prose) and GSM8K worked solutions (math), one process. `extra` is the
   annotator's cost over bare tokenization (goal for the cheap ones: < 20%). unigram/tfidf also need
   a first counting pass over the train split (one more tokenization pass), reported separately.
   `model` uses the checkpoint of run 2's uniform model (same tokenizer), on CPU.
2. Effect: the same small model (configs/density/math_*.yaml: block diffusion, block 32, t in
   [0.3, 0.8], w = 2, the paper's setting) trained on the same annotated GSM8K
   shards for the same number of data tokens with uniform / density_priority / complementary masking
   through `python -m pretrain.launch`; validation NLL is the uniform-t, uniform-mask NELBO for all.
   complementary makes two forward rows per sequence (same data tokens, ~2x compute). With
   --model-run (default) one more density_priority run uses shards annotated by the `model`
   annotator (the uniform run's checkpoint) instead of `structure`.
Sudoku exact-match accuracy needs a sampler (pretrain/sample.py); the column is skipped when absent.
Prints a table, writes bench/results/bench_density.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.config import DataConfig, DensityConfig  # noqa: E402
from data_pipeline.density import annotate, build_annotator  # noqa: E402
from data_pipeline.density.annotators import STATS_FILE, chunk_counts, save_stats  # noqa: E402
from data_pipeline.document import Document  # noqa: E402
from data_pipeline.encode import encode_chunk  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, make_tokenizer  # noqa: E402

CORPORA = REPO / ".." / "shared" / "corpora"
RESULTS = REPO / "bench" / "results" / "bench_density.json"
POLICIES = ("uniform", "density_priority", "complementary")
# complementary makes two forward rows per sequence: its compute-matched control is uniform masking
# with twice the sequences per step (the same steps, rows and FLOPs; twice the data tokens)
COMPUTE_MATCHED = "uniform_2x"


def _texts(name: str, n: int) -> list[str]:
    if name == "wikitext-2":
        paras, cur = [], []
        for line in (CORPORA / "wikitext-2" / "valid.txt").read_text().splitlines():
            if line.strip():
                cur.append(line)
            elif cur:
                paras.append("\n".join(cur))
                cur = []
        return paras[:n]
    rows = (CORPORA / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(r)["answer"] for r in rows]


def _time(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(corpus: str, texts: list[str], tok, checkpoint: str | None, tmp: Path, model_docs: int = 200) -> list[dict]:
    flat, lengths, _ = encode_chunk(texts, tokenizer=tok)
    n_tok = len(flat)
    t_bare = _time(lambda: encode_chunk(texts, tokenizer=tok))
    d = tmp / corpus
    d.mkdir(parents=True, exist_ok=True)
    t_first = _time(lambda: save_stats(d / STATS_FILE, *chunk_counts(*encode_chunk(texts, tokenizer=tok)[:2],
                                                                     tok.vocab_size), len(lengths)), 1)
    rows = [{"corpus": corpus, "annotator": "bare tokenization", "tokens": n_tok, "tok_per_s": n_tok / t_bare,
             "extra_pct": 0.0}]
    for name in ("unigram", "tfidf", "structure", "model"):
        if name == "model" and not checkpoint:
            continue
        dcfg = SimpleNamespace(**{**vars(DensityConfig()), "annotator": name, "checkpoint": checkpoint or "",
                                  "device": "cpu", "batch_size": 64})
        t0 = time.perf_counter()
        ann = build_annotator(dcfg, tok, d)
        setup = time.perf_counter() - t0

        sub = texts[:model_docs] if name == "model" else texts
        n_sub = int(sum(encode_chunk(sub, tokenizer=tok)[1])) if name == "model" else n_tok
        t_bare_sub = _time(lambda sub=sub: encode_chunk(sub, tokenizer=tok)) if name == "model" else t_bare

        def work(sub=sub, ann=ann):
            f, lens, _ = encode_chunk(sub, tokenizer=tok)
            annotate(ann, f, lens, "scores")

        t = _time(work, 1 if name == "model" else 2)
        row = {"corpus": corpus, "annotator": name, "tokens": n_sub, "tok_per_s": n_sub / t,
               "extra_pct": 100.0 * (t - t_bare_sub) / t_bare_sub, "setup_s": setup}
        if name in ("unigram", "tfidf"):
            row["first_pass_s"] = t_first
            row["first_pass_extra_pct"] = 100.0 * t_first / t_bare
        rows.append(row)
    return rows


def launch(recipe: str, policy_run: str, out: Path, steps: int, extra: list[str]) -> dict:
    done = list(out.rglob(f"{policy_run}/summary.json"))
    if done:  # --runs-dir: a run this bench finished in an earlier invocation
        summary = json.loads(done[0].read_text())
        if summary.get("steps") == steps:
            return summary
    cmd = [sys.executable, "-m", "pretrain.launch", "--config", recipe, "--log-level", "WARNING", "--set",
           f"train.steps={steps}", f"train.eval_every={steps}", "train.eval_batches=16", "tracking.enabled=false",
           f"launch.output_dir={out}", f"launch.run_name={policy_run}", "train.device=cpu", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(next(out.rglob(f"{policy_run}/summary.json")).read_text())
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def sudoku(steps: int, out: Path, samples: int, n_train: int) -> list[dict]:
    """The reasoning task: uniform on plain sudoku shards, then density_priority and complementary on
    shards annotated by the `model` annotator with the uniform run's checkpoint (configs/density/
    sudoku_density.yaml); val NLL (uniform NELBO) and greedy confidence decoding of the answer grid
    (pretrain.evaluate: cell accuracy, exact match) on `samples` validation puzzles."""
    size = ["model.n_layers=2", "model.d_model=64", "train.batch_size=16", "train.eval_batches=4",
            "model.block_size=0", f"data.task.num_train={n_train}", "data.density.context_masks=2"]
    rows = []
    runs = [("uniform", "configs/tasks/sudoku_mdm.yaml", [])]
    for policy in ("density_priority", "complementary"):
        runs.append((policy, "configs/density/sudoku_density.yaml", [f"diffusion.masking={policy}"]))
    ckpt = None
    for policy, recipe, extra in runs:
        if ckpt:
            extra = extra + [f"data.density.checkpoint={ckpt}", "data.density.device=cpu", "data.build_workers=1"]
        s = launch(recipe, f"sudoku-{policy}", out, steps, size + extra)
        run_dir = next(out.rglob(f"sudoku-{policy}"))
        ckpt = ckpt or str(run_dir)
        metrics_file = out / f"sudoku-{policy}-eval.json"
        cmd = [sys.executable, "-m", "pretrain.evaluate", "--run", str(run_dir), "--num-samples", str(samples),
               "--batch-size", str(samples), "--tokens-per-step", "9", "--eval-batches", "-1", "--device", "cpu",
               "--no-mlflow", "--show", "0", "--json", str(metrics_file)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        m = json.loads(metrics_file.read_text()) if proc.returncode == 0 and metrics_file.is_file() else {}
        rows.append({"policy": policy, "annotator": "none" if policy == "uniform" else "model (uniform run)",
                     "val_nll": s["final_val_nll"], "train_s": s["elapsed_s"], "tokens": s["tokens"],
                     "task_metrics": m, "eval_error": None if m else (proc.stderr or proc.stdout)[-800:]})
        print(f"  sudoku {policy}: val NLL {s['final_val_nll']:.4f}; {m}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="training steps per run")
    ap.add_argument("--small", action="store_true",
                    help="a CPU-minutes budget: model 2 x 64, batch 16, eval 8 batches (default: the recipe's 4 x 128, batch 32)")
    ap.add_argument("--docs", type=int, default=2000, help="documents per corpus for the throughput part")
    ap.add_argument("--no-model-run", action="store_true", help="skip the model-annotator training run")
    ap.add_argument("--runs-dir", help="keep runs here (reused when already finished with the same steps)")
    ap.add_argument("--model-docs", type=int, default=200, help="documents for the model annotator's throughput")
    ap.add_argument("--sudoku-train", type=int, default=1000, help="sudoku training puzzles (the model annotator "
                    "scores all of them on CPU)")
    ap.add_argument("--sudoku-only", action="store_true",
                    help="run only the sudoku part and add it to an existing bench_density.json")
    ap.add_argument("--sudoku-samples", type=int, default=64, help="validation puzzles decoded per sudoku run")
    ap.add_argument("--recipe", default="math", choices=("math", "code", "text"),
                    help="configs/density/<recipe>_{uniform,density_priority,complementary}.yaml")
    ap.add_argument("--normalize", default="",
                    help="override data.density.normalize (the first report used rank; default: the recipe's)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the annotation throughput part")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds of the effect runs")
    ap.add_argument("--json", default=str(RESULTS), help="where to write the results")
    ap.add_argument("--no-compute-matched", action="store_true",
                    help=f"skip {COMPUTE_MATCHED}: uniform masking with twice the batch, complementary's compute")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_density-"))
    result: dict = {"host": platform.node(), "cpus": os.cpu_count(), "steps": args.steps, "effect": [],
                    "throughput": []}

    if args.sudoku_only:
        result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else result
        result["sudoku"] = sudoku(args.steps, Path(args.runs_dir or tmp) / "sudoku", args.sudoku_samples,
                                  args.sudoku_train)
        result["sudoku_steps"] = args.steps
        result["sudoku_accuracy"] = "measured: see 'sudoku' (python bench/bench_density.py --sudoku-only)"
        print_sudoku(result)
        RESULTS.write_text(json.dumps(result, indent=1))
        print(f"wrote {RESULTS}")
        return 0
    # 2. effect (first: its uniform run's checkpoint also serves the model annotator's throughput)
    runs = Path(args.runs_dir) if args.runs_dir else tmp / "runs"
    size = ["model.n_layers=2", "model.d_model=64", "train.batch_size=16", "train.eval_batches=8"] if args.small else []
    if args.normalize:
        size.append(f"data.density.normalize={args.normalize}")
    result["overrides"], result["recipe"] = size, args.recipe
    from pretrain.config import load_config

    annotator = load_config(REPO / f"configs/density/{args.recipe}_base.yaml").data.density.annotator
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    # seed-major: a sweep cut short still has all three policies of the first seeds
    base = load_config(REPO / f"configs/density/{args.recipe}_base.yaml", ["train.eval_batches=16", *size]).train
    arms = POLICIES + (() if args.no_compute_matched else (COMPUTE_MATCHED,))
    for seed in args.seeds:
        for policy in arms:
            name = f"bench-{args.recipe}-{policy}" + (f"-s{seed}" if seed else "")
            recipe, extra = policy, []
            if policy == COMPUTE_MATCHED:
                # half the evaluation batches of twice the size: the same held-out rows and t draws
                recipe, extra = "uniform", [f"train.batch_size={2 * base.batch_size}",
                                            f"train.eval_batches={base.eval_batches // 2}"]
            s = launch(f"configs/density/{args.recipe}_{recipe}.yaml", name, runs, args.steps,
                       size + [f"seed={seed}"] + extra)
            result["effect"].append({"policy": policy, "annotator": annotator, "seed": seed,
                                     "val_nll": s["final_val_nll"], "initial_val_nll": s["initial_val_nll"],
                                     "tokens": s["tokens"], "train_s": s["elapsed_s"], "wall_s": s.get("wall_s")})
            print(f"  seed {seed} {policy}: val NLL {s['final_val_nll']:.4f} ({s['elapsed_s']:.0f} s)", flush=True)
            out_json.write_text(json.dumps(result, indent=1))
    ckpt = str(next(runs.rglob(f"bench-{args.recipe}-uniform")))
    if not args.no_model_run:
        s = launch(f"configs/density/{args.recipe}_density_priority.yaml", f"bench-{args.recipe}-model-priority",
                   runs, args.steps,
                   ["data.density.annotator=model", f"data.density.checkpoint={ckpt}", "data.density.device=cpu",
                    "data.build_workers=1", *size])
        result["effect"].append({"policy": "density_priority", "annotator": "model (uniform run)",
                                 "val_nll": s["final_val_nll"], "initial_val_nll": s["initial_val_nll"],
                                 "tokens": s["tokens"], "train_s": s["elapsed_s"]})
    sample_available = (REPO / "pretrain" / "sample.py").is_file()
    result["sudoku_accuracy"] = "not measured: pretrain/sample.py (a sampler) is not available yet" \
        if not sample_available else "not in this invocation: run with --sudoku-only (adds 'sudoku' to this JSON)"

    if args.no_throughput:
        print_effect(result, args)
        out_json.write_text(json.dumps(result, indent=1))
        print(f"wrote {out_json}")
        return 0
    # 1. throughput
    from data_pipeline.build import resolve_shard_dir

    math_tok = load_tokenizer(resolve_shard_dir(load_config(REPO / "configs/density/math_base.yaml",
                                                               size).data))
    wiki = _texts("wikitext-2", args.docs)
    wiki_tok = make_tokenizer(DataConfig(tokenizer="sentencepiece", vocab_size=2048),
                              (Document(str(i), t) for i, t in enumerate(wiki)))
    result["throughput"] += throughput("wikitext-2", wiki, wiki_tok, None, tmp)
    result["throughput"] += throughput("gsm8k", _texts("gsm8k", args.docs), math_tok, ckpt, tmp, args.model_docs)

    print(f"\nannotation throughput (1 process, {args.docs} documents per corpus)")
    print(f"{'corpus':11s} {'annotator':18s} {'tokens':>8s} {'tok/s':>11s} {'extra':>8s}  first pass")
    for r in result["throughput"]:
        fp = f"+{r['first_pass_extra_pct']:.0f}% once" if "first_pass_extra_pct" in r else ""
        print(f"{r['corpus']:11s} {r['annotator']:18s} {r['tokens']:8d} {r['tok_per_s']:11,.0f} "
              f"{r['extra_pct']:+7.1f}%  {fp}")
    print_effect(result, args)
    print(f"sudoku accuracy: {result['sudoku_accuracy']}")
    out_json.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_json}")
    return 0


def print_effect(result: dict, args) -> None:
    print(f"\neffect: {args.recipe} recipe, block diffusion {'2x64, batch 16' if args.small else '4x128, batch 32'}, "
          f"{args.steps} steps of 128-token rows, same data tokens per run; val NLL = uniform-mask block NELBO "
          "(nats/token)")
    print(f"{'policy':18s} {'density from':22s} {'seed':>4s} {'init NLL':>8s} {'val NLL':>8s} {'train s':>8s}")
    for r in result["effect"]:
        print(f"{r['policy']:18s} {r['annotator']:22s} {r.get('seed', 0):4d} {r['initial_val_nll']:8.4f} "
              f"{r['val_nll']:8.4f} {r['train_s']:8.0f}")
    import statistics

    base = {r.get("seed", 0): r["val_nll"] for r in result["effect"] if r["policy"] == "uniform"}
    for policy in POLICIES + (COMPUTE_MATCHED,):
        rs = [r for r in result["effect"] if r["policy"] == policy and r["annotator"] != "model (uniform run)"]
        if not rs:
            continue
        v = [r["val_nll"] for r in rs]
        d = [100.0 * (r["val_nll"] - base[r.get("seed", 0)]) / base[r.get("seed", 0)] for r in rs
             if r.get("seed", 0) in base]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        sdd = statistics.stdev(d) if len(d) > 1 else 0.0
        print(f"{policy:18s} val NLL {statistics.fmean(v):.4f} +- {sd:.4f} over {len(v)} seeds; "
              f"vs uniform (paired): {statistics.fmean(d):+.2f}% +- {sdd:.2f}%")


def print_sudoku(result: dict) -> None:
    print(f"\nsudoku (built-in task, MDM 2x64, batch 16, {result.get('sudoku_steps')} steps; greedy confidence "
          "decoding, 9 cells per step)")
    print(f"{'policy':18s} {'density from':22s} {'val NLL':>8s} {'cell acc':>9s} {'exact':>7s}")
    for r in result.get("sudoku", []):
        m = r["task_metrics"].get("metrics", r["task_metrics"])
        cell = next((v for k, v in m.items() if "cell" in k), float("nan"))
        exact = next((v for k, v in m.items() if "exact" in k or "solve" in k), float("nan"))
        print(f"{r['policy']:18s} {r['annotator']:22s} {r['val_nll']:8.4f} {cell:9.4f} {exact:7.4f}")


if __name__ == "__main__":
    sys.exit(main())
