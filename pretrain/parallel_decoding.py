"""How far decoding k tokens per step departs from the joint (seed 003's measurement).

Seed 003 ("Why mask diffusion does not work", arXiv 2510.03289) argues that a mask diffusion model
outputs per-token *marginals* p(x_i | x_t), so committing k tokens from one forward samples from
their product, not from the joint, and parallel decoding loses coherence. This module measures it
on a trained task run: the validation prompts are decoded with k tokens per step (LLaDA's
fixed-count sampler of pretrain/sample.py: `confidence` order, greedy by default; the same tokens as
`generate(..., SamplerConfig(name=order, tokens_per_step=k, block_size=...))`), for each k of a list
(1, 2, 4, ..., all at once), optionally semi-autoregressively in blocks, and reports per k:

- the task's metrics (`task/solved`, `task/cell_acc` for Sudoku) and, for Sudoku, the constraint
  violations of the decoded grid (`sudoku/violations`: row + column + box duplicates, see
  `data_pipeline.tasks.sudoku.unit_duplicates`; `sudoku/non_digit`: cells that got no digit, which
  count no duplicate; `sudoku/givens_changed`), means per puzzle;
- the marginal-joint gap. For a step that commits tokens v_1..v_k (in the sampler's own order of
  preference) at positions s_1..s_k from state x:
      marginal = sum_j log p(x_{s_j} = v_j | x)                          (the one forward)
      joint    = sum_j log p(x_{s_j} = v_j | x, v_1..v_{j-1} committed)   (chain rule, k forwards;
                                                                         the first is the same one)
      gap      = marginal - joint
  `gap/step` is its mean over decoding steps, `gap/token` the total over the total decoded tokens.
  It is 0 for k = 1 (to rounding: both terms come from the same forward) and grows when the
  committed tokens are each likely alone but not together (e.g. two equal digits in one Sudoku row:
  the second becomes unlikely once the first is in). `nll/marginal` and `nll/joint` are the two
  sums per decoded token. p is the model's distribution at temperature 1 without the forbidden ids
  (mask, PAD, BOS, EOS), renormalised: the distribution the greedy sampler ranks.

Variants: mdm and scatter (the masked-diffusion samplers; `block_size` > 0 = semi-AR blocks) and
block (BD3-LM: its own blocks, each forward on the prefix up to the current block). ar decodes one
token per step by construction and jigsaw generates a block left to right: both are refused.

    python -m pretrain.parallel_decoding --run runs/tasks/sudoku_mdm --k 1,2,4,8,all --block-size 0,9
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.device import resolve_device
from data_pipeline.tasks import get_task, sudoku
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError
from pretrain.evaluate import _prompt_batch, load_model
from pretrain.model import unwrap
from pretrain.sample import MDM_SAMPLERS, SamplerConfig, _select_top, draw, order_scores, transfer_counts

PARALLEL_VARIANTS = ("mdm", "scatter", "block")
ORDERS = tuple(s for s in MDM_SAMPLERS if s != "ancestral")  # fixed-count samplers: k per step
ALL = 0  # k = 0: every masked token of the block (or sequence) in one step


@dataclass
class ParallelDecode:
    """What one batch's decoding gives, per row (float64 sums over the row's decoding steps)."""

    tokens: torch.Tensor  # Long[B, L]
    marginal: torch.Tensor  # sum over committed tokens of log p(v | state of their step)
    joint: torch.Tensor  # the chain-rule log-likelihood of the same tokens, step by step
    steps: torch.Tensor  # Long[B]: steps that committed at least one token of the row
    committed: torch.Tensor  # Long[B]: tokens decoded
    forwards: int  # model forwards of the decoding itself (as generate's nfe)
    joint_forwards: int  # the extra forwards of the chain rule

    @property
    def gap(self) -> torch.Tensor:
        return self.marginal - self.joint


def parse_ks(text: str) -> list[int]:
    """'1,2,4,all' -> [1, 2, 4, 0] (0 = all at once); errors name the bad entry."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            out.append(ALL)
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--k: {part!r} is not a positive integer or 'all' (e.g. --k 1,2,4,8,all)")
        out.append(int(part))
    return out


def k_label(k: int) -> str:
    return "all" if k == ALL else str(k)


@torch.no_grad()
def decode_parallel(
    model,
    x: torch.Tensor,
    gen_mask: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    mask_id: int,
    k: int,
    order: str = "confidence",
    block_size: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
    forbid_ids: Sequence[int] = (),
    joint: bool = True,
) -> ParallelDecode:
    """Fill `gen_mask` with k tokens per step (k = 0: all at once), measuring the marginal-joint gap
    of every step (module docstring); `joint=False` skips the chain-rule forwards (gap = 0)."""
    inner = unwrap(model)
    variant = inner.cfg.variant
    if variant not in PARALLEL_VARIANTS:
        raise ValueError(f"parallel decoding measures the masked-diffusion samplers ({', '.join(PARALLEL_VARIANTS)}); "
                         f"a {variant!r} model decodes one token per step (ar) or a block left to right (jigsaw)")
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: expected one of {', '.join(ORDERS)}")
    if k < 0:
        raise ValueError(f"k = {k}: tokens per step must be >= 1 (0 = all at once)")
    device, (B, L) = x.device, x.shape
    if variant == "block":
        if block_size not in (0, inner.block_len(L)):
            raise ValueError(f"a block model decodes in its own blocks ({inner.block_len(L)}); block_size {block_size}")
        bl, truncate = inner.block_len(L), True
    else:
        bl, truncate = (block_size or L), False
    cfg = SamplerConfig(name=order, temperature=temperature, seed=seed)
    forbid = sorted({int(mask_id), *(int(i) for i in forbid_ids)})
    gen = torch.Generator(device=device).manual_seed(seed)  # as generate(): the same draws, the same tokens
    x = x.clone()
    masked = gen_mask.to(device).bool().clone()
    x[masked] = mask_id
    kpm = torch.ones_like(masked) if key_padding_mask is None else key_padding_mask.to(device).bool()
    time_cond = bool(getattr(inner.cfg, "time_conditioning", False))
    stats = {"marginal": torch.zeros(B, dtype=torch.float64), "joint": torch.zeros(B, dtype=torch.float64),
             "steps": torch.zeros(B, dtype=torch.long), "committed": torch.zeros(B, dtype=torch.long)}
    counter = {"forwards": 0, "joint_forwards": 0}

    def forward(xx, mm, upto):
        t = None
        if time_cond:
            real = kpm[:, :upto]
            t = (mm[:, :upto] & real).sum(1).float() / real.sum(1).clamp(min=1).float()
        return model(xx[:, :upto], t, key_padding_mask=kpm[:, :upto])

    def logp_of(logits_rows, tokens):  # log p(token) under the model's renormalised distribution
        lg = logits_rows.double()
        lg[:, forbid] = -math.inf
        return lg.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]

    was_training = inner.training
    inner.eval()
    try:
        pos = torch.arange(L, device=device)
        for b in range(math.ceil(L / bl)):
            active = (pos // bl == b)[None, :].expand_as(masked)
            todo = active & masked
            if not todo.any():
                continue
            upto = min((b + 1) * bl, L) if truncate else L
            steps, counts = transfer_counts(todo.sum(1), 0, k if k > 0 else L)
            for s in range(steps):
                cur = active & masked
                counter["forwards"] += 1
                if not cur.any():
                    continue
                logits = forward(x, masked, upto)
                r, c = cur[:, :upto].nonzero(as_tuple=True)
                tokens, probs = draw(logits[r, c], cfg, gen, forbid)
                score = torch.full(x.shape, -math.inf, dtype=probs.dtype, device=device)
                score[r, c] = order_scores(order, tokens, probs, gen)
                proposal = torch.zeros_like(x)
                proposal[r, c] = tokens
                chosen = _select_top(score, cur, counts[:, s].to(device))
                lp = torch.zeros(x.shape, dtype=torch.float64, device=device)
                lp[r, c] = logp_of(logits[r, c], tokens)
                marginal = (lp * chosen).sum(1).cpu()
                # the step's own order of preference: rank 0 = the token a one-per-step sampler takes first
                rank = score.masked_fill(~chosen, -math.inf).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
                n_chosen = chosen.sum(1)
                joint_lp = (lp * (chosen & (rank == 0))).sum(1).cpu()
                if joint:
                    for j in range(1, int(n_chosen.max())):
                        before = chosen & (rank < j)
                        xj = torch.where(before, proposal, x)
                        lg = forward(xj, masked & ~before, upto)
                        counter["joint_forwards"] += 1
                        sel = chosen & (rank == j)
                        rr, cc = sel[:, :upto].nonzero(as_tuple=True)
                        step_lp = torch.zeros(B, dtype=torch.float64, device=device)
                        step_lp.index_add_(0, rr, logp_of(lg[rr, cc], proposal[rr, cc]))
                        joint_lp += step_lp.cpu()
                else:
                    joint_lp = marginal.clone()
                stats["marginal"] += marginal
                stats["joint"] += joint_lp
                stats["steps"] += (n_chosen > 0).long().cpu()
                stats["committed"] += n_chosen.cpu()
                x[chosen] = proposal[chosen]
                masked &= ~chosen
    finally:
        inner.train(was_training)
    return ParallelDecode(tokens=x, **stats, **counter)


def _sudoku_counts(example, text: str) -> dict[str, float]:
    cells = [int(ch) if ch in "123456789" else 0 for ch in text[:81].ljust(81, "0")]
    puzzle = sudoku.from_text(example.prompt[:81])
    dup = sudoku.unit_duplicates(cells)
    return {"sudoku/violations": float(dup["total"]), "sudoku/row_dups": float(dup["row"]),
            "sudoku/col_dups": float(dup["col"]), "sudoku/box_dups": float(dup["box"]),
            "sudoku/givens_changed": float(sum(cells[i] != v for i, v in enumerate(puzzle) if v)),
            "sudoku/non_digit": float(sum(v == 0 for v in cells))}


@torch.no_grad()
def parallel_decoding_metrics(model, cfg, info, ks: Sequence[int], block_sizes: Sequence[int] = (0,),
                              order: str = "confidence", num_samples: int = 64, batch_size: int = 64,
                              device: torch.device | str = "cpu", joint: bool = True, temperature: float = 0.0,
                              seed: int = 0) -> list[dict]:
    """One row per (block_size, k) over the first `num_samples` validation examples of a task run:
    the task's metrics (`task/...`, means), Sudoku's violations (`sudoku/...`, means per puzzle),
    `gap/step`, `gap/token`, `nll/marginal`, `nll/joint` (per decoded token), `steps` (decoding
    forwards per batch) and `joint_forwards` (extra forwards per batch)."""
    if not cfg.data.source.startswith("task:"):
        raise ValueError(f"parallel decoding is measured on a task run (data.source task:NAME); got {cfg.data.source!r}")
    task = get_task(cfg.data.source.removeprefix("task:"))
    tok = info.tokenizer
    n = min(num_samples, cfg.data.task.num_val)
    if n < 1:
        raise ValueError("--num-samples must be >= 1")
    examples = list(task.examples("val", n, cfg.data.task.seed, cfg.data.task))
    batches = []
    for start in range(0, n, batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tok.encode(e.prompt) for e in chunk]
        lens = [len(tok.encode(e.answer)) for e in chunk]
        batches.append((chunk, *_prompt_batch(prompts, lens, info, cfg.data.seq_len)))
    rows = []
    for bs in block_sizes:
        for k in ks:
            scores, gaps, marg, jnt, n_steps, n_tok, fw, jfw = [], 0.0, 0.0, 0.0, 0, 0, [], []
            for chunk, x, gen, real in batches:
                out = decode_parallel(model, x.to(device), gen.to(device), real.to(device), mask_id=info.mask_id,
                                      k=k, order=order, block_size=bs, temperature=temperature, seed=seed,
                                      forbid_ids=(info.pad_id, info.bos_id, info.eos_id), joint=joint)
                tokens = out.tokens.cpu()
                for i, e in enumerate(chunk):
                    text = tok.decode(tokens[i][gen[i]].tolist())
                    s = task.score(e, text)
                    if task.name == "sudoku":
                        s.update(_sudoku_counts(e, text))
                    scores.append(s)
                gaps += float(out.gap.sum())
                marg += float(out.marginal.sum())
                jnt += float(out.joint.sum())
                n_steps += int(out.steps.sum())
                n_tok += int(out.committed.sum())
                fw.append(out.forwards)
                jfw.append(out.joint_forwards)
            agg = task.aggregate(scores)
            row = {"k": k_label(k), "block_size": bs, "order": order, "examples": n,
                   **{(key if key.startswith("sudoku/") else f"task/{key}"): v for key, v in agg.items()},
                   "gap/step": gaps / max(n_steps, 1), "gap/token": gaps / max(n_tok, 1),
                   "nll/marginal": -marg / max(n_tok, 1), "nll/joint": -jnt / max(n_tok, 1),
                   "steps": sum(fw) / len(fw), "joint_forwards": sum(jfw) / len(jfw), "joint_measured": joint}
            rows.append(row)
    return rows


COLUMNS = ("block_size", "k", "steps", "task/solved", "task/cell_acc", "sudoku/violations", "sudoku/non_digit",
           "sudoku/givens_changed", "gap/step", "gap/token", "nll/marginal", "nll/joint")


def format_rows(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
    """An aligned table of the rows (columns absent from every row are left out)."""
    cols = [c for c in columns if any(c in r for r in rows)]
    width = {c: max(len(c), 8) for c in cols}

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["  ".join(f"{c:>{width[c]}}" for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(f"{cell(r.get(c, '')):>{width[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    p = argparse.ArgumentParser(
        prog="python -m pretrain.parallel_decoding",
        description="Seed 003's measurement on a task run: solve rate, Sudoku constraint violations and the gap "
                    "between marginal and chain-rule likelihood of the committed tokens, vs tokens per step.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its latest checkpoint)")
    src.add_argument("--checkpoint", help="a checkpoint directory (checkpoints/step_*, any layout) or a file in it")
    p.add_argument("--k", default="1,2,4,8,16,32,all", help="tokens per step, comma separated; 'all' = one step")
    p.add_argument("--block-size", default="0",
                   help="semi-AR block sizes, comma separated (0 = the whole answer; block models use their own)")
    p.add_argument("--order", default="confidence", choices=ORDERS, help="which k tokens a step commits")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--num-samples", type=int, default=64, help="validation examples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-joint", action="store_true", help="skip the chain-rule forwards (no gap; faster)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights, not their moving average (train.ema)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", help="also write the rows (and what was run) to this JSON file")
    args = p.parse_args(argv)

    try:
        device = resolve_device(args.device, "--device")
        ks = parse_ks(args.k)
        block_sizes = [int(b) for b in args.block_size.split(",")]
        if any(b < 0 for b in block_sizes):
            raise ValueError(f"--block-size {args.block_size}: sizes must be >= 0")
        model, cfg, info, meta = load_model(args.run or args.checkpoint, device, ema=False if args.no_ema else None)
        path = meta["checkpoint"]
        rows = parallel_decoding_metrics(model, cfg, info, ks, block_sizes, args.order, args.num_samples,
                                         args.batch_size, device, joint=not args.no_joint,
                                         temperature=args.temperature, seed=args.seed)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {path}  variant={cfg.model.variant} order={args.order} T={args.temperature} device={device.type} "
          f"seed={args.seed} examples={rows[0]['examples']}")
    print(format_rows(rows))
    if args.json:
        record = {"checkpoint": str(path), "ema": meta["ema"], "variant": cfg.model.variant, "masking": cfg.diffusion.masking,
                  "order": args.order, "temperature": args.temperature, "device": device.type, "seed": args.seed,
                  "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
