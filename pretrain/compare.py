"""Compare runs from MLflow: a table, PNG plots and a markdown report.

    python -m pretrain.compare --experiment lm1b                           # every run of the experiment
    python -m pretrain.compare --experiment lm1b --tag time_sampler=bell --tag time_sampler=uniform
    python -m pretrain.compare --runs RUN_ID RUN_ID --baseline RUN_ID --out reports/bell_vs_uniform
    python -m pretrain.compare --experiment repro_bell --headline time_sampler=uniform:bell   # per-seed ratio

The headline column is "tokens to reach the baseline's final validation NLL" and its ratio to the
baseline's own tokens (seed 001 claims bell-shaped time sampling gets there ~4x sooner than
uniform). Validation NLL is the unbiased uniform-t bound for every masked-diffusion run, so runs
with different time samplers compare fairly. Runs are labelled by the config values that differ
between them.

`--headline KEY=BASE:TREAT` answers seed 001's question across seeds: runs are paired by `seed`;
for each pair, the tokens TREAT needs to reach BASE's final validation NLL, and two ratios (> 1:
TREAT is faster): BASE's tokens to first reach that NLL / TREAT's (conservative when BASE's curve
has flattened out), and BASE's whole budget / TREAT's (the paper's "same NLL, N x fewer steps");
then the mean and spread over seeds. A TREAT run that never gets there gives upper bounds.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Config keys that never explain a difference between runs (where and how a run was launched).
_IGNORED_PARAM_PREFIXES = ("launch.", "tracking.", "name", "data.shard_dir")


@dataclass
class RunRecord:
    run_id: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]
    status: str
    val_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_elapsed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens_per_s: float = math.nan
    label: str = ""

    @property
    def final_nll(self) -> float:
        return float(self.val_nll[-1]) if len(self.val_nll) else math.nan

    @property
    def best_nll(self) -> float:
        return float(self.val_nll.min()) if len(self.val_nll) else math.nan

    @property
    def wall_s(self) -> float:
        return float(self.val_elapsed[-1]) if len(self.val_elapsed) else math.nan

    @property
    def tokens(self) -> float:
        return float(self.val_tokens[-1]) if len(self.val_tokens) else math.nan


def tokens_to_reach(tokens: np.ndarray, nll: np.ndarray, target: float) -> float:
    """Tokens at which the validation curve first reaches `target`, linearly interpolated between
    evaluations; NaN if it never does."""
    for i, value in enumerate(nll):
        if value <= target:
            if i == 0:
                return float(tokens[0])
            x0, x1, y0, y1 = tokens[i - 1], tokens[i], nll[i - 1], nll[i]
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1)) if y0 != y1 else float(x1)
    return math.nan


def _history(client, run_id: str, key: str) -> list:
    """One value per step, the latest logged: `pretrain.evaluate` logs the same names as the trainer
    (val/nll at the checkpoint's step), and its later, fuller evaluation replaces the trainer's point."""
    by_step = {m.step: m for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))}
    return [by_step[s] for s in sorted(by_step)]


def load_runs(uri: str, experiment: str | None, run_ids: list[str], tags: list[str]) -> list[RunRecord]:
    """Runs selected by id, or by experiment and tag filters (KEY=VALUE; the same key twice = either)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        if not experiment:
            raise ValueError("give --experiment or --runs")
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments())
            raise ValueError(f"no experiment {experiment!r} at {uri}; experiments there: {names or 'none'}")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        wanted: dict[str, set[str]] = {}
        for item in tags:
            key, _, value = item.partition("=")
            wanted.setdefault(key, set()).add(value)
        runs = [r for r in runs if all(r.data.tags.get(k) in vs for k, vs in wanted.items())]
    records = []
    for r in runs:
        rec = RunRecord(r.info.run_id, r.info.run_name or r.info.run_id[:8], dict(r.data.params),
                        dict(r.data.tags), r.info.status)
        val = _history(client, r.info.run_id, "val/nll")
        by_step_tokens = {m.step: m.value for m in _history(client, r.info.run_id, "val/tokens_seen")}
        by_step_elapsed = {m.step: m.value for m in _history(client, r.info.run_id, "val/elapsed_s")}
        rec.val_nll = np.array([m.value for m in val])
        rec.val_tokens = np.array([by_step_tokens.get(m.step, math.nan) for m in val])
        rec.val_elapsed = np.array([by_step_elapsed.get(m.step, math.nan) for m in val])
        loss = _history(client, r.info.run_id, "train/loss")
        rec.train_steps = np.array([m.step for m in loss])
        rec.train_loss = np.array([m.value for m in loss])
        tps = [m.value for m in _history(client, r.info.run_id, "train/tokens_per_s")]
        rec.tokens_per_s = float(np.median(tps)) if tps else math.nan
        records.append(rec)
    label_runs(records)
    return records


def label_runs(records: list[RunRecord]) -> None:
    """Label each run by the config values that differ between the runs (its name if none do)."""
    # keys every run has: a key only newer code logs is not a difference between the experiments
    keys = sorted(set.intersection(*(set(r.params) for r in records))) if records else []
    differing = [
        k for k in keys
        if not k.startswith(_IGNORED_PARAM_PREFIXES) and len({r.params.get(k) for r in records}) > 1
    ]
    for r in records:
        # an AR run's diffusion settings are unused: naming them would suggest a bell or uniform AR run
        keys = [k for k in differing if not (r.params.get("model.variant") == "ar" and k.startswith("diffusion."))]
        parts = [f"{k.split('.')[-1]}={r.params.get(k)}" for k in keys[:4]]
        r.label = ", ".join(parts) if parts else r.name
    if len({r.label for r in records}) < len(records):  # e.g. seeds differ only in ignored keys
        for r in records:
            r.label = f"{r.label} ({r.name})" if r.label != r.name else r.name


@dataclass
class Comparison:
    runs: list[RunRecord]
    baseline: RunRecord
    target_nll: float
    rows: list[dict]


def compare(records: list[RunRecord], baseline: str | None = None, target_nll: float | None = None) -> Comparison:
    """The table: per run, final/best NLL, tokens to reach the target and the speedup over the baseline.

    The baseline is the run named/identified by `baseline`, or the first run with a tag/config value
    given as KEY=VALUE (default: the first run); the target is
    the baseline's final validation NLL unless given."""
    if not records:
        raise ValueError("no runs matched")
    base = records[0]
    if baseline:
        if "=" in baseline:  # KEY=VALUE: the first run with that tag or config value (names carry a hash)
            key, _, value = baseline.partition("=")
            matches = [r for r in records if _value(r, key) == value]
        else:
            matches = [r for r in records if baseline in (r.run_id, r.name) or r.run_id.startswith(baseline)]
        if not matches:
            raise ValueError(f"baseline {baseline!r} is not among the selected runs: {[r.name for r in records]}")
        base = matches[0]
    target = base.final_nll if target_nll is None else target_nll
    base_tokens = tokens_to_reach(base.val_tokens, base.val_nll, target)
    rows = []
    for r in records:
        reach = tokens_to_reach(r.val_tokens, r.val_nll, target)
        rows.append({
            "run": r.name, "run_id": r.run_id, "label": r.label, "status": r.status,
            "final_val_nll": r.final_nll, "best_val_nll": r.best_nll,
            "tokens": r.tokens, "tokens_to_target": reach,
            "speedup_vs_baseline": base_tokens / reach if reach and not math.isnan(reach) else math.nan,
            "tokens_per_s": r.tokens_per_s, "wall_s": r.wall_s, "baseline": r is base,
        })
    return Comparison(records, base, target, rows)


def _value(r: RunRecord, key: str) -> str | None:
    """A tag (`time_sampler`) or a logged config value (`diffusion.time_sampler`) of a run."""
    return r.tags.get(key, r.params.get(key))


@dataclass
class Headline:
    key: str
    base: str
    treat: str
    pairs: list[dict]  # one per seed with both a BASE and a TREAT run

    def ratios(self) -> np.ndarray:
        """The seeds' speedups where TREAT reached the target (upper bounds left out)."""
        return np.array([p["ratio"] for p in self.pairs if p["reached"]])


def headline(records: list[RunRecord], key: str, base: str, treat: str) -> Headline:
    """Per seed: tokens TREAT needs to reach BASE's final NLL, and BASE's tokens to get there / TREAT's."""
    # pairs share the seed and the model variant (an AR reference logged beside them pairs with nothing)
    by_seed: dict[tuple[str, str], dict[str, RunRecord]] = {}
    for r in records:
        value = _value(r, key)
        if value in (base, treat):
            group = (r.params.get("seed", "?"), r.params.get("model.variant", ""))
            by_seed.setdefault(group, {}).setdefault(value, r)
    pairs = []
    for group in sorted(by_seed, key=lambda g: (g[1], len(g[0]), g[0])):
        seed, runs = group[0], by_seed[group]
        if base not in runs or treat not in runs:
            continue
        b, t = runs[base], runs[treat]
        target = b.final_nll
        b_tokens = tokens_to_reach(b.val_tokens, b.val_nll, target)
        t_tokens = tokens_to_reach(t.val_tokens, t.val_nll, target)
        reached = not math.isnan(t_tokens)
        pairs.append({
            "seed": seed, "base_run": b.name, "treat_run": t.name, "target_nll": target,
            "base_final_nll": b.final_nll, "treat_final_nll": t.final_nll,
            "base_tokens": b_tokens, "base_budget": b.tokens, "treat_tokens": t_tokens, "reached": reached,
            # never reached: TREAT would need more than all its tokens, so the ratios are below these
            "ratio": b_tokens / (t_tokens if reached else t.tokens),
            # the paper's reading: BASE's whole budget over TREAT's tokens to the same NLL (>= ratio)
            "budget_ratio": b.tokens / (t_tokens if reached else t.tokens),
        })
    if not pairs:
        raise ValueError(f"--headline {key}={base}:{treat}: no seed has both a {base!r} and a {treat!r} run")
    return Headline(key, base, treat, pairs)


def format_headline(h: Headline) -> str:
    """Markdown: one row per seed, then the ratio's mean and spread."""
    lines = [
        f"| seed | {h.base} final NLL (target) | {h.treat} final NLL | {h.base} tokens to target (first reached) | "
        f"{h.base} tokens (budget) | {h.treat} tokens to target | speedup vs first reached | speedup vs budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in h.pairs:
        reach = f"{p['treat_tokens']:,.0f}" if p["reached"] else "never reached"
        bound = "" if p["reached"] else "< "
        lines.append(f"| {p['seed']} | {p['target_nll']:.4f} | {p['treat_final_nll']:.4f} | "
                     f"{p['base_tokens']:,.0f} | {p['base_budget']:,.0f} | {reach} | "
                     f"{bound}{p['ratio']:.2f}x | {bound}{p['budget_ratio']:.2f}x |")
    r = h.ratios()
    rb = np.array([p["budget_ratio"] for p in h.pairs if p["reached"]])
    if len(r) == len(h.pairs) and len(r) > 1:
        summary = (f"speedup of {h.treat} over {h.base} (vs first reached): mean {r.mean():.2f}x, std "
                   f"{r.std(ddof=1):.2f}, range {r.min():.2f}x-{r.max():.2f}x over {len(r)} seeds; vs {h.base}'s "
                   f"budget: mean {rb.mean():.2f}x, range {rb.min():.2f}x-{rb.max():.2f}x")
    elif len(r) == len(h.pairs):
        summary = (f"speedup of {h.treat} over {h.base}: {r[0]:.2f}x vs first reached, {rb[0]:.2f}x vs "
                   f"{h.base}'s budget (1 seed)")
    else:
        summary = (f"{h.treat} did not reach {h.base}'s final NLL in {len(h.pairs) - len(r)} of "
                   f"{len(h.pairs)} seeds (the ratio is then an upper bound)"
                   + (f"; where it did: {', '.join(f'{x:.2f}x' for x in r)} vs first reached" if len(r) else ""))
    # the same question without thresholds: is TREAT's final NLL lower, beyond the seeds' spread?
    diff = np.array([p["treat_final_nll"] - p["base_final_nll"] for p in h.pairs])
    summary += (f"\nfinal NLL, {h.treat} - {h.base}: mean {diff.mean():+.4f} nats"
                + (f", std {diff.std(ddof=1):.4f}, range {diff.min():+.4f} to {diff.max():+.4f} over {len(diff)} seeds"
                   if len(diff) > 1 else " (1 seed)"))
    return "\n".join(lines + ["", summary])


def format_table(c: Comparison, markdown: bool = False) -> str:
    head = ["run", "label", "final NLL", "best NLL", "tokens", f"tokens to NLL {c.target_nll:.4f}",
            "speedup", "tokens/s", "wall s"]

    def fmt(x: float, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    body = [[
        row["run"] + (" (baseline)" if row["baseline"] else ""), row["label"],
        fmt(row["final_val_nll"], ".4f"), fmt(row["best_val_nll"], ".4f"), fmt(row["tokens"], ",.0f"),
        fmt(row["tokens_to_target"], ",.0f"), fmt(row["speedup_vs_baseline"], ".2f") + "x",
        fmt(row["tokens_per_s"], ",.0f"), fmt(row["wall_s"], ".1f"),
    ] for row in c.rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def _group(label: str) -> str:
    """A run's label without its seed: the configuration it belongs to."""
    return re.sub(r"(, )?seed=\d+", "", label).strip(", ") or label


def plot(c: Comparison, out_dir: Path) -> list[Path]:
    """PNG plots: validation NLL vs tokens and vs wall-clock, training loss vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    # one colour per configuration, so several seeds of it read as one family of curves
    palette = plt.get_cmap("tab10").colors
    groups = list(dict.fromkeys(_group(r.label) for r in c.runs))
    colours = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    specs = [
        ("val_nll_vs_tokens.png", "tokens seen", "validation NLL (nats/token)", lambda r: (r.val_tokens, r.val_nll)),
        ("val_nll_vs_wall.png", "wall-clock (s)", "validation NLL (nats/token)", lambda r: (r.val_elapsed, r.val_nll)),
        ("train_loss.png", "step", "training loss", lambda r: (r.train_steps, r.train_loss)),
    ]
    paths = []
    for filename, xlabel, ylabel, series in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for r in c.runs:
            x, y = series(r)
            if len(x):
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=r.label,
                        linewidth=2.2 if r is c.baseline else 1.6, color=colours[_group(r.label)])
        if filename.startswith("val_nll") and not math.isnan(c.target_nll):
            ax.axhline(c.target_nll, color="grey", linestyle="--", linewidth=1, label="baseline's final NLL")
        if filename.startswith("val_nll"):
            # the step-0 evaluation (~log V) and transient spikes would squash the range where the runs
            # differ: the axes span the lowest value up to the highest first evaluation after step 0
            firsts = [float(r.val_nll[1]) for r in c.runs if len(r.val_nll) > 1 and np.isfinite(r.val_nll[1])]
            lows = [float(np.nanmin(r.val_nll)) for r in c.runs if len(r.val_nll)]
            if firsts and lows:
                lo, hi = min(lows), max(firsts)
                pad = 0.05 * (hi - lo) or 0.1
                ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(ylabel + " vs " + xlabel)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(c: Comparison, plots: list[Path], out_dir: Path, head: Headline | None = None) -> Path:
    lines = [
        "# Run comparison", "",
        f"Baseline: `{c.baseline.name}` ({c.baseline.label}); target NLL = the baseline's final validation NLL "
        f"{c.target_nll:.4f}. Speedup = the baseline's tokens to reach the target / the run's.", "",
        format_table(c, markdown=True), "",
    ]
    if head is not None:
        lines += [f"## Headline: {head.treat} vs {head.base} ({head.key}), paired by seed", "",
                  format_headline(head), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.compare",
                                description="Compare training runs logged to MLflow: table, plots, markdown report.")
    p.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: the local store)")
    p.add_argument("--experiment", help="experiment name to select runs from")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs with this tag (e.g. time_sampler=bell); the same key twice means either value")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN_ID", help="explicit run ids instead of a search")
    p.add_argument("--baseline", help="run name or id the others are compared to, or KEY=VALUE: the first run with "
                                      "that tag or config value, e.g. time_sampler=uniform (default: the first run)")
    p.add_argument("--target-nll", type=float, help="NLL target (default: the baseline's final validation NLL)")
    p.add_argument("--headline", metavar="KEY=BASE:TREAT",
                   help="per seed, the tokens TREAT needs to reach BASE's final NLL and the speedup, with its "
                        "mean and spread over seeds, e.g. time_sampler=uniform:bell (KEY: a tag or config key)")
    p.add_argument("--out", default="reports/compare", help="folder for the PNG plots and report.md")
    p.add_argument("--attach", action="store_true",
                   help="also attach the plots and report to every compared run in MLflow (artifact folder compare/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        records = load_runs(args.uri, args.experiment, args.runs, args.tag)
        c = compare(records, args.baseline, args.target_nll)
        head = None
        if args.headline:
            key, _, pair = args.headline.partition("=")
            base, _, treat = pair.partition(":")
            if not (key and base and treat):
                raise ValueError(f"--headline {args.headline!r}: expected KEY=BASE:TREAT, e.g. time_sampler=uniform:bell")
            head = headline(records, key, base, treat)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    plots = plot(c, out)
    report = write_report(c, plots, out, head)
    if args.attach:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=args.uri)
        for r in c.runs:
            for path in (*plots, report):
                client.log_artifact(r.run_id, str(path), artifact_path="compare")
    print(format_table(c))
    if head is not None:
        print("\n" + format_headline(head))
    print(f"\nplots: {', '.join(str(p) for p in plots)}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
