"""Throughput of the streaming loader against a memmap floor and peer readers, on the same tokens.

Why: the loader must never be what a training step waits for. Each reader produces the same kind of
batch the trainer takes ({"input_ids": Long[B, L], "loss_mask": Bool[B, L]}, `wrap` packing, the
LM1B setup at L=128) from the same documents, and we count tokens/s:
- memmap floor: the packed stream stored uncompressed (uint16) and read in order, no shuffle;
- this loader (zstd shards, seeded shard/document/window shuffle) with 0, 1 and 2 workers;
  with 1 worker and `data.wrap_doc_shuffle` (rows re-cut every epoch); `pad` packing with 0
  workers; and `wrap` with 0 workers and the decoded-shard cache off, i.e. what a dataset much
  larger than the cache costs (every shard decompressed again each epoch);
- megatron-core IndexedDataset (written with IndexedDatasetBuilder), documents read in a shuffled
  order and packed the same way (what GPTDataset does per sample, without its index build);
- HF datasets streaming over a parquet file of the same documents, with its shuffle buffer;
- the same loader reading the shards from S3 (a moto server on 127.0.0.1, the build uploaded there)
  through its local cache (data_pipeline/remote.py), started cold (empty cache) each repeat, with
  and without the decoded-shard cache; the disk cache bounded at a quarter of the split, so later
  epochs download again what was evicted. `x local` is its rate over the same local reader's, in
  the same run (needs `pip install "moto[server]" s3fs`, else those rows are skipped);
- what a CPU training step of the quickstart model consumes (tokens/s of its batches, measured here
  with the trainer's step: objective, backward, clipping, AdamW), the base of the 50x goal.
Each reader is measured `--repeats` times, interleaved (reader A, B, C, A, B, C, ...) so that a
busy moment of a shared machine hits all of them, and the median is reported. `tok/s` is steady
state (from the first batch on); start-up (worker processes, first shards) is reported apart as
`1st batch s` and folded into `incl. start` over `--tokens` tokens.
Data: the plain-text corpora under /work/shared/corpora (WikiText-2, PTB, TinyShakespeare; linked,
never copied into the repo), tokenized with a sentencepiece model trained at build time; shards are
built once under data/shards/ (gitignored) and reused. The dataset is small (~0.75M tokens, ~91
batches per epoch), so readers loop over it for many epochs: the floor reads from CPU caches and is,
if anything, flattered, and the loader pays its per-epoch work (document shuffle, stream build)
every 91 batches.

Usage: python bench/bench_stream.py [--quick] [--tokens N] [--repeats 3] [--readers SUBSTRING ...]
Writes bench/results/bench_stream.json (gitignored) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipeline.build import ensure_shards
from data_pipeline.config import DataConfig
from data_pipeline.packing import SplitSamples
from data_pipeline.shards import ShardReader
from data_pipeline.stream import make_train_loader

CORPORA = Path("/work/shared/corpora")
TEXT_FILES = ["wikitext-2/valid.txt", "ptb/ptb.valid.txt", "tinyshakespeare/input.txt"]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_stream.json"
SEQ_LEN, BATCH = 128, 64


def build() -> tuple[DataConfig, object]:
    """Shards of the text corpora (a stable, gitignored directory of links to them: nothing is copied)."""
    src = (Path("data") / "bench_stream_corpora").resolve()
    src.mkdir(parents=True, exist_ok=True)
    for rel in TEXT_FILES:
        link = src / rel.replace("/", "__")
        if not link.exists():
            link.symlink_to(CORPORA / rel)
    cfg = DataConfig(source=str(src), tokenizer="sentencepiece", vocab_size=8192, txt_documents="paragraph",
                     shard_size_mb=0.25, shard_dir="data/shards/bench_stream_text", seq_len=SEQ_LEN,
                     packing="wrap", shuffle_buffer=1024)
    return cfg, ensure_shards(cfg, progress=False)


def documents(info) -> list[np.ndarray]:
    return [np.asarray(d, dtype=np.uint16) for d in ShardReader(info.train_dir).iter_documents()]


def pack(docs: Iterator[np.ndarray], bos: int, eos: int) -> Iterator[dict[str, torch.Tensor]]:
    """`[BOS] doc [EOS]` concatenated and cut into [BATCH, SEQ_LEN] batches (the peers' packing)."""
    need = BATCH * SEQ_LEN
    parts: list[np.ndarray] = []
    have = 0
    sep_b, sep_e = np.array([bos], np.uint16), np.array([eos], np.uint16)
    for d in docs:
        parts += [sep_b, d, sep_e]
        have += len(d) + 2
        if have >= need:
            flat = np.concatenate(parts)
            while len(flat) >= need:
                yield {"input_ids": torch.from_numpy(flat[:need].astype(np.int64).reshape(BATCH, SEQ_LEN)),
                       "loss_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.bool)}
                flat = flat[need:]
            parts, have = [flat], len(flat)


def memmap_floor(work: Path, docs, info) -> Callable[[], Iterator]:
    stream = np.concatenate([np.concatenate([[info.bos_id], d, [info.eos_id]]) for d in docs]).astype(np.uint16)
    path = work / "stream.u16"
    stream.tofile(path)

    def run():
        mm = np.memmap(path, dtype=np.uint16, mode="r")
        n = len(mm) // (BATCH * SEQ_LEN)
        i = 0
        while True:
            arr = mm[i * BATCH * SEQ_LEN:(i + 1) * BATCH * SEQ_LEN].reshape(BATCH, SEQ_LEN)
            yield {"input_ids": torch.from_numpy(arr.astype(np.int64)),
                   "loss_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.bool)}
            i = (i + 1) % n
    return run


def uncached(loader) -> None:
    """The same stream with no decoded shard kept across epochs."""
    ds = loader.dataset
    ds.sources = [SplitSamples(s.dir, s.seq_len, s.packing, s.pad_id, s.bos_id, s.eos_id, seed=s.seed,
                               shuffle=s.shuffle, window=s.window, cache_bytes=0,
                               wrap_doc_shuffle=s.wrap_doc_shuffle) for s in ds.sources]


def ours(cfg: DataConfig, info, workers: int, packing: str = "wrap", cache: bool = True,
         doc_shuffle: bool = False) -> Callable[[], Iterator]:
    def run():
        c = DataConfig(**{**cfg.__dict__, "num_workers": workers, "packing": packing, "wrap_doc_shuffle": doc_shuffle})
        loader = make_train_loader(c, info, batch_size=BATCH, seed=0)
        if not cache:
            uncached(loader)
        return loader
    return run


def s3_server() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 and its endpoint (AWS_* variables point s3fs at it)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return server, f"http://127.0.0.1:{port}"


def remote_build(info) -> str:
    """The local build uploaded to the S3 server; its URL."""
    from data_pipeline import remote

    url = "s3://bench/bench_stream_text"
    fs, _ = remote.url_to_fs(url)
    fs.mkdir("bench")
    remote.upload_build(Path(info.shard_dir), url)
    return url


def ours_remote(cfg: DataConfig, url: str, work: Path, cache: bool = True) -> Callable[[], Iterator]:
    """This loader on the S3 copy, from an empty disk cache bounded at a quarter of the train split."""
    from data_pipeline.build import ensure_shards as ensure

    def run():
        root = Path(tempfile.mkdtemp(dir=work))
        split_bytes = sum(s["bytes"] for s in ShardReader(Path(cfg.shard_dir) / "train").shards)
        c = DataConfig(**{**cfg.__dict__, "shard_dir": url, "cache_dir": str(root),
                          "cache_limit_gb": split_bytes / 4 / (1 << 30)})
        info = ensure(c, progress=False)
        loader = make_train_loader(c, info, batch_size=BATCH, seed=0)
        if not cache:
            uncached(loader)
        return loader
    return run


def megatron(work: Path, docs, info) -> Callable[[], Iterator]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    prefix = str(work / "megatron")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    def run():
        ds = IndexedDataset(prefix)
        n = len(ds)

        def docs_forever():
            epoch = 0
            while True:
                for i in np.random.default_rng([0, epoch]).permutation(n):
                    yield ds[int(i)]
                epoch += 1
        return pack(docs_forever(), info.bos_id, info.eos_id)
    return run


def hf_streaming(work: Path, docs, info) -> Callable[[], Iterator]:
    import datasets

    datasets.disable_progress_bars()
    path = work / "docs.parquet"
    datasets.Dataset.from_dict({"ids": [d.tolist() for d in docs]}).to_parquet(str(path))

    def run():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        ds = ds.shuffle(seed=0, buffer_size=1024)

        def docs_forever():
            epoch = 0
            while True:
                ds.set_epoch(epoch)
                for row in ds:
                    yield np.asarray(row["ids"], dtype=np.uint16)
                epoch += 1
        return pack(docs_forever(), info.bos_id, info.eos_id)
    return run


def measure(make: Callable[[], Iterator], tokens: int) -> dict:
    """Steady-state tokens/s (first batch excluded) and tokens/s including start-up, over `tokens`."""
    n_batches = max(2, tokens // (BATCH * SEQ_LEN))
    t0 = time.perf_counter()
    it = iter(make())
    checksum = int(next(it)["input_ids"][:, 0].sum())  # touch the data
    t1 = time.perf_counter()
    for _ in range(n_batches - 1):
        checksum += int(next(it)["input_ids"][:, 0].sum())
    t2 = time.perf_counter()
    close = getattr(it, "close", None)
    if close is not None:
        close()
    del it
    return {"tokens": n_batches * BATCH * SEQ_LEN, "seconds": t2 - t0, "first_batch_s": t1 - t0,
            "tokens_per_s": (n_batches - 1) * BATCH * SEQ_LEN / (t2 - t1),
            "tokens_per_s_incl_startup": n_batches * BATCH * SEQ_LEN / (t2 - t0)}


def train_step_tokens_per_s(steps: int = 6) -> tuple[float, str]:
    """Tokens/s of the quickstart model's training step (Trainer.train_step's work), torch's threads."""
    from pretrain.config import load_config
    from pretrain.diffusion import step_rng
    from pretrain.model import build_model
    from pretrain.variants import build_objective

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "quickstart.yaml")
    vocab, L, B = 16, cfg.data.seq_len, cfg.train.batch_size  # Sudoku: 12 symbols + 4 specials
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab, L)
    objective = build_objective(cfg.diffusion, cfg.model.variant, mask_id=vocab - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab - 1, (B, L), generator=g),
             "loss_mask": torch.ones(B, L, dtype=torch.bool)}
    times = []
    for step in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        loss, _ = objective.training_loss(model, batch, step_rng(0, step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return B * L / statistics.median(times[1:]), f"quickstart step [{B}, {L}], {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and one repeat (a smoke run)")
    p.add_argument("--tokens", type=int, default=0,
                   help="tokens each reader produces per repeat (default 64M, quick 4M; HF streaming: at most 2M)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats per reader, median reported (default 3)")
    p.add_argument("--train-tokens-per-s", type=float, default=0.0,
                   help="tokens/s of a quickstart training step, instead of measuring it here")
    p.add_argument("--readers", nargs="+", default=[],
                   help="run only the readers whose names contain one of these (the floor always runs)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # 64M tokens: the loader's start-up transient (worker start, first epoch's decoding, prefetch
    # fill, allocator warm-up) lasts its first ~4M tokens; `incl. start` reports it
    tokens = args.tokens or (4_000_000 if args.quick else 64_000_000)
    repeats = args.repeats or (1 if args.quick else 3)

    if args.train_tokens_per_s:
        train_rate, train_how = args.train_tokens_per_s, "given with --train-tokens-per-s"
    else:
        try:
            train_rate, train_how = train_step_tokens_per_s(2 if args.quick else 6)
        except Exception as e:  # noqa: BLE001 - the trainer is another package: say why and go on
            train_rate, train_how = 23_000.0, f"not measured ({type(e).__name__}: {e}); 23000 assumed"
    print(f"training step: {train_rate:,.0f} tokens/s ({train_how})", flush=True)
    torch.set_num_threads(1)  # readers: one thread each, like a dataloader worker

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg, info = build()
        docs = documents(info)
        n_tok = sum(len(d) for d in docs)
        readers: list[tuple[str, Callable[[], Iterator]]] = [
            ("memmap floor (uint16, in order)", memmap_floor(work, docs, info)),
            ("this loader, wrap, 0 workers", ours(cfg, info, 0)),
            ("this loader, wrap, 1 worker", ours(cfg, info, 1)),
            ("this loader, wrap, 2 workers", ours(cfg, info, 2)),
            ("this loader, wrap, 1 w, doc shuffle", ours(cfg, info, 1, doc_shuffle=True)),
            ("this loader, pad, 0 workers", ours(cfg, info, 0, "pad")),
            ("this loader, wrap, 0 w, no cache", ours(cfg, info, 0, cache=False)),
            ("megatron-core IndexedDataset", megatron(work, docs, info)),
        ]
        try:
            readers.append(("HF datasets streaming (parquet)", hf_streaming(work, docs, info)))
        except Exception as e:  # noqa: BLE001 - an optional peer; say why it is missing
            print(f"HF datasets streaming skipped: {e}")
        server = None
        try:
            server, _ = s3_server()
            url = remote_build(info)
            readers += [("remote S3, wrap, 0 workers", ours_remote(cfg, url, work)),
                        ("remote S3, wrap, 0 w, no cache", ours_remote(cfg, url, work, cache=False))]
        except Exception as e:  # noqa: BLE001 - moto/s3fs are optional (the dev extra): say why
            print(f"remote S3 readers skipped: {type(e).__name__}: {e}")
        if args.readers:
            readers = readers[:1] + [r for r in readers[1:] if any(k in r[0] for k in args.readers)]
        runs: dict[str, list[dict]] = {name: [] for name, _ in readers}
        for rep in range(repeats):
            for name, make in readers:
                if name.startswith("HF") and rep:
                    continue  # ~300x slower than the rest: one short run gives its rate
                r = measure(make, min(tokens // 8, 2_000_000) if name.startswith("HF") else tokens)
                runs[name].append(r)
                print(f"  [{rep + 1}/{repeats}] {name}: {r['tokens_per_s'] / 1e6:.1f} M tokens/s", flush=True)
        if server is not None:
            server.stop()

    rows = []
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "tokens_per_s_incl_startup",
                                                                  "first_batch_s")}
        rows.append({"reader": name, "tokens": rs[0]["tokens"], "repeats": len(rs), **med,
                     "tokens_per_s_all": [r["tokens_per_s"] for r in rs]})
    floor = rows[0]["tokens_per_s"]
    mega = next((r["tokens_per_s"] for r in rows if r["reader"].startswith("megatron")), float("nan"))
    print(f"\n{len(docs):,} documents, {n_tok:,} tokens; batches [{BATCH}, {SEQ_LEN}]; {tokens:,} tokens per "
          f"reader and repeat; median of {repeats}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; training step {train_rate:,.0f} tokens/s")
    print(f"{'reader':36s} {'M tok/s':>8s} {'x floor':>8s} {'x megatron':>10s} {'x train':>8s} "
          f"{'incl. start':>11s} {'1st batch s':>11s}")
    for r in rows:
        r["x_floor"] = r["tokens_per_s"] / floor
        r["x_megatron"] = r["tokens_per_s"] / mega
        r["x_train_step"] = r["tokens_per_s"] / train_rate
        if r["reader"].startswith("remote S3"):  # over the same reader on local disk, this run
            twin = {"remote S3, wrap, 0 workers": "this loader, wrap, 0 workers",
                    "remote S3, wrap, 0 w, no cache": "this loader, wrap, 0 w, no cache"}[r["reader"]]
            base = next((x for x in rows if x["reader"] == twin), None)
            if base is not None:
                r["x_local"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["x_local_incl_startup"] = r["tokens_per_s_incl_startup"] / base["tokens_per_s_incl_startup"]
        print(f"{r['reader']:36s} {r['tokens_per_s'] / 1e6:8.2f} {r['x_floor']:8.3f} {r['x_megatron']:10.2f} "
              f"{r['x_train_step']:8.0f} {r['tokens_per_s_incl_startup'] / 1e6:11.2f} {r['first_batch_s']:11.3f}")
    for r in rows:
        if "x_local" in r:
            print(f"{r['reader']}: {r['x_local']:.3f}x the local reader steady state, "
                  f"{r['x_local_incl_startup']:.3f}x including start-up (cold cache)")
    one = next((r for r in rows if r["reader"] == "this loader, wrap, 1 worker"), None)
    goals = {} if one is None else {"x_floor >= 0.5": one["x_floor"] >= 0.5, "x_megatron >= 1": one["x_megatron"] >= 1,
             "x_train_step >= 50": one["x_train_step"] >= 50}
    print("goals (1 worker): " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "seq_len": SEQ_LEN, "batch_size": BATCH, "tokens_per_reader": tokens, "repeats": repeats,
        "dataset_docs": len(docs), "dataset_tokens": n_tok, "train_tokens_per_s": train_rate,
        "train_step": train_how, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "python": platform.python_version(), "torch": torch.__version__, "goals_1_worker": goals, "results": rows,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
