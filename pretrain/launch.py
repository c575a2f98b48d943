"""The single entry point: `python -m pretrain.launch --config FILE [--set key=value ...] [--dry-run]`.

It loads and validates the config, decides where the run lives (`<output_dir>/<experiment>/<run_name>`,
resumed automatically when that directory holds a checkpoint), prints the plan, and runs the
training function. Backends (`launch.backend`): `local` starts `launch.nproc` ranks on this machine;
`slurm` submits a Slurm job through submitit (`slurm/`: code snapshot, rendezvous, checkpoint and
requeue on preemption) and prints its id and logs; `auto` picks Slurm when the config needs more
than this machine has and a Slurm controller answers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
from pathlib import Path

from common.plugins import load_plugin
from data_pipeline.build import ensure_shards, is_complete, resolve_shard_dir
from data_pipeline.shards import ShardFormatError
from data_pipeline.sources import (
    DataSourceError,
    DataSourceUnavailable,
    hub_reachable,
    local_files,
    parse_hf_source,
)
from data_pipeline.tasks import get_task
from data_pipeline.tokenizer import TokenizerError, load_tokenizer, make_tokenizer
from parallel.topology import from_env
from pretrain.checkpoint import CheckpointError, latest_checkpoint
from pretrain.config import (
    RUN_LENGTH_KEYS,
    Config,
    ConfigError,
    config_hash,
    descriptive_run_name,
    flatten,
    load_config,
    recipe_defaults,
    save_config,
    to_yaml,
)
from pretrain.model import build_model
from pretrain.model.attention_masks import is_two_stream
from pretrain.stop import StopFlag, Stopped
from pretrain.tracking import prepare_store
from pretrain.train import NonFiniteLossError, train

log = logging.getLogger("pretrain.launch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.launch",
        description="Train a masked/blockwise diffusion language model from a YAML recipe.",
        epilog="example: python -m pretrain.launch --config configs/quickstart.yaml --set train.steps=100",
    )
    p.add_argument("--config", required=True, help="YAML recipe (may `inherit:` another), e.g. configs/lm1b_bell.yaml")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values with dotted keys, e.g. --set train.lr=3e-4 model.n_layers=4")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the plan (for Slurm: the submitit parameters and the "
                        "sbatch header), run or submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="slurm backend: wait for the job (through requeues) and report how it ended; "
                        "exit status 0 when it completed")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging level of rank 0 (other ranks log warnings and errors only)")
    return p.parse_args(argv)


def setup_logging(level: str, rank: int) -> None:
    import warnings

    # megatron-core warns at import that Transformer Engine/Apex are absent; we use neither
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class ConsoleLog:
    """`<run_dir>/train.log`: what the console shows, kept with the run (appended across resumes): the
    resolved config and plan, every log line, the progress bar's loss at each log_every step
    (`pretrain.progress`, file only: the bar shows it on the console) and the closing summary."""

    def __init__(self) -> None:
        self.pending: list[str] = []  # printed before the run directory exists
        self.handler: logging.Handler | None = None

    def say(self, text: str, file=None) -> None:
        print(text, file=file or sys.stdout, flush=True)
        if self.handler is not None:
            self.handler.stream.write(text + "\n")
            self.handler.flush()
        else:
            self.pending.append(text)

    def open(self, run_dir: Path, rank: int) -> None:
        self.handler = logging.FileHandler(run_dir / "train.log")
        self.handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                                    datefmt="%H:%M:%S"))
        self.handler.stream.write("".join(t + "\n" for t in self.pending))
        self.pending.clear()
        logging.getLogger().addHandler(self.handler)
        progress = logging.getLogger("pretrain.progress")
        progress.addHandler(self.handler)  # (it does not propagate: the bar shows it on the console)
        progress.setLevel(logging.INFO)

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            logging.getLogger("pretrain.progress").removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def run_name_for(cfg: Config) -> str:
    return cfg.launch.run_name or f"{cfg.name}-{config_hash(cfg)}"


def name_the_run(cfg: Config, config_path: str | None) -> None:
    """Set launch.run_name (when not given) to what says how this run differs: recipe, seed, the keys
    set away from the recipe, hash (`lm1b_bell-s0-lr=0.0003-1a2b3c4d`). A run directory of the older
    `<recipe>-<hash>` name is kept, so its runs still resume."""
    if cfg.launch.run_name:
        return
    name = descriptive_run_name(cfg, recipe_defaults(config_path))
    parent = Path(cfg.launch.output_dir) / cfg.tracking.experiment
    legacy = f"{cfg.name}-{config_hash(cfg)}"
    cfg.launch.run_name = legacy if (parent / legacy).is_dir() and not (parent / name).exists() else name


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.launch.output_dir) / cfg.tracking.experiment / run_name_for(cfg)


def check_data_sources(cfg: Config) -> None:
    """Fail now, not minutes into the run, on a source that cannot be read: a local file or directory
    that does not exist, an unknown task, a mixture shard directory that is not there. Nothing is
    checked when the shards are already built (the source is then not read again)."""
    d = cfg.data
    if not is_complete(resolve_shard_dir(d)):
        if d.source.startswith("task:"):
            try:
                get_task(d.source.removeprefix("task:"))
            except ValueError as e:
                raise DataSourceError(f"data.source={d.source!r}: {e}") from None
        elif d.source.startswith("hf:"):
            try:
                parse_hf_source(d.source)
            except ValueError as e:
                raise DataSourceError(f"data.source: {e}") from None
        else:
            try:
                local_files(d.source)
            except DataSourceError as e:
                raise DataSourceError(f"data.source: {e}") from None
    for i, m in enumerate(d.mixture):
        p = Path(m.shard_dir)
        if not ((p / "index.json").is_file() or (p / "train" / "index.json").is_file()):
            raise DataSourceError(f"data.mixture[{i}].shard_dir={m.shard_dir!r} holds no built shards "
                                  "(index.json or train/index.json); build it first with python -m data_pipeline.build")


def model_size(cfg: Config, vocab_size: int) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the model, built on the meta device (no memory).

    FLOPs per token: 6 x the parameters that multiply (all but the embedding lookup) for the forward
    and backward matmuls, plus 12 x n_layers x d_model x seq_len for attention scores and values
    (PaLM's estimate, appendix B); two-stream passes (block; jigsaw_streams 2) run 2L positions,
    so both terms double. An estimate: masks are not subtracted and norms/softmax are ignored."""
    import torch

    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size, cfg.data.seq_len)
    params = sum(p.numel() for p in model.parameters())
    matmul = params - model.tok_emb.weight.numel() * (0 if cfg.model.tie_embeddings else 1)
    flops = 6 * matmul + 12 * cfg.model.n_layers * cfg.model.d_model * cfg.data.seq_len
    if is_two_stream(cfg.model.variant, cfg.model.jigsaw_streams):
        flops *= 2
    return params, flops


def _vocab_size(cfg: Config) -> tuple[int, str]:
    """The tokenizer's size (and where it came from) without building anything."""
    shard_dir = resolve_shard_dir(cfg.data)
    try:
        return load_tokenizer(shard_dir).vocab_size, "the built tokenizer"
    except Exception:
        pass
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    if cfg.data.tokenizer == "task" and cfg.data.source.startswith("task:"):
        try:
            return make_tokenizer(cfg.data).vocab_size, "the task's tokenizer"
        except Exception:
            pass
    if cfg.data.tokenizer == "sentencepiece":
        return cfg.data.vocab_size, "data.vocab_size, specials and [MASK] included, once trained"
    return 0, "unknown until the tokenizer is loaded"


DROPOUT_KEYS = ("model.dropout", "model.attention_dropout", "model.embedding_dropout")  # no weights: may change


# keys a resumed run may not change: the weights would not load, or would mean something else
def _fixed_on_resume(key: str) -> bool:
    return (key.startswith("model.") and key not in DROPOUT_KEYS) or key in ("data.tokenizer", "data.vocab_size")


def resume_changes(cfg: Config, run_dir: Path) -> str | None:
    """What a resume of `run_dir` changes, in one line (None: nothing to resume, or nothing changed).

    Refuses (ConfigError naming every differing key) a resume whose model would not be the one
    the checkpoint holds; run-length keys (config.RUN_LENGTH_KEYS) and others are reported."""
    if not cfg.launch.resume:
        return None
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError:
        return None  # the trainer reports it
    if latest is None or not (latest / "config.yaml").is_file():
        return None
    try:
        before = flatten(load_config(latest / "config.yaml"))
    except ConfigError:
        return None
    now = flatten(cfg)
    diff = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
            if not k.startswith(("launch.", "tracking.", "parallel.")) and before.get(k) != now.get(k)}
    fixed = {k: v for k, v in diff.items() if _fixed_on_resume(k)}
    if fixed:
        raise ConfigError(
            f"{run_dir} holds checkpoint {latest.name} of another model; resuming it would not load: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in fixed.items())
            + ". Give the new model its own run (drop launch.run_name, or set another), or set launch.resume=false "
            "to start this directory over")
    if not diff:
        return None
    kind = "extends" if set(diff) <= set(RUN_LENGTH_KEYS) else "resumes with changes:"
    note = ""
    if "train.steps" in diff and cfg.train.lr_schedule != "constant":
        note = (f" (lr_schedule {cfg.train.lr_schedule}: the decay is recomputed for the new length, so the "
                "learning rate jumps at the resume step)")
    return f"{kind} {latest.name}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()) + note


def plan(cfg: Config) -> str:
    """What will run where, in a few lines (printed by --dry-run and at start)."""
    d, m, f, t = cfg.data, cfg.model, cfg.diffusion, cfg.train
    shard_dir = resolve_shard_dir(d)
    built = (shard_dir / "train" / "index.json").is_file()
    run_dir = run_dir_for(cfg)
    try:
        resume = latest_checkpoint(run_dir, checksums=False) if cfg.launch.resume else None
    except CheckpointError as e:
        resume = f"unusable checkpoint ({e})"
    tokens = t.steps * t.batch_size * d.seq_len
    vocab, vocab_from = _vocab_size(cfg)
    params, flops = model_size(cfg, max(vocab, 1))
    if d.source.startswith("hf:") and not built:
        hub = f"yes, to build the shards (hub reachable now: {'yes' if hub_reachable() else 'NO'})"
    else:
        hub = "no" + (" (shards built)" if built else f" ({d.source.split(':')[0] if ':' in d.source else 'local'} source)")
    objective = (
        "next-token cross-entropy" if m.variant == "ar" else
        f"{f.schedule} schedule, {f.time_sampler} t on [{max(f.eps, f.t_min)}, {f.t_max}], {f.weighting} weighting, "
        f"{f.masking} masking"
        + (f" ({f.density_form}: " + (f"w = {f.density_ratio}" if f.density_form == "ratio" else f"s = {f.density_strength}")
           + (f", syntactic {f.syntactic}" + (f" w = {f.syntactic_ratio}" if f.syntactic == "priority" else "")
              if f.masking == "complementary" else "") + ")"
           if f.masking != "uniform" else "")
    )
    lines = [
        f"backend     {cfg.launch.backend}: "
        + (f"{cfg.launch.nodes} node(s) x " if cfg.launch.backend != "local" else "")
        + f"{cfg.launch.nproc} process(es), device {t.device}, dtype {t.dtype}",
        f"data        {d.source} (tokenizer {d.tokenizer}, {d.packing} packing, seq_len {d.seq_len})",
        f"shards      {shard_dir} ({'built' if built else 'will be built first'})",
        f"data hub    {hub}",
        f"model       {m.variant}: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, {m.mlp} MLP",
        f"size        {params / 1e6:.3f}M parameters "
        + (f"(vocabulary {vocab}: {vocab_from}), " if vocab else f"without the embeddings ({vocab_from}), ")
        + 
        f"{flops / 1e6:.3f} MFLOPs per training token, {flops * tokens / 1e15:.4g} PFLOPs in all",
        f"objective   {objective}",
        f"train       {t.steps} steps x {t.batch_size} sequences x {d.seq_len} = {tokens / 1e6:.2f}M tokens in all, lr {t.lr}",
        f"run dir     {run_dir} ({f'resumes from {resume}' if resume else 'new run'})",
        f"tracking    {cfg.tracking.uri if cfg.tracking.enabled else 'off'}"
        + (f" (experiment {cfg.tracking.experiment!r})" if cfg.tracking.enabled else ""),
    ]
    return "\n".join(lines)


CHILD_ENV = "DLM_LAUNCH_CHILD"  # set in the ranks the local launcher starts: they train, never spawn
PARENT_ENV = "DLM_LAUNCH_PARENT"  # the launcher's pid, for the ranks' parent-death check
STOPPED_CODES = (130, 143)  # a rank that stopped on Ctrl-C/SIGTERM with its checkpoint (128 + signal)


def die_with_launcher() -> None:
    """In a rank the local launcher started: have the kernel send this process SIGTERM when the
    launcher dies, however it dies (SIGKILL, OOM killer), so no rank trains on as an orphan. SIGTERM
    takes the stop path of pretrain/stop.py: the ranks agree, checkpoint and end the MLflow run KILLED.
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing is set."""
    import ctypes
    import signal

    parent = int(os.environ.get(PARENT_ENV, "0"))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank may outlive its launcher",
                        ctypes.get_errno())
    except (OSError, AttributeError):  # no prctl (not Linux)
        return
    if parent and os.getppid() != parent:  # the launcher died before the line above: stop now
        os.kill(os.getpid(), signal.SIGTERM)


def spawn_local(argv: list[str], nproc: int, timeout_s: float) -> int:
    """Start `nproc` ranks of this same command on this machine (torchrun's job) and watch them.

    Why not torchrun: its workers start in a new session with no parent-death signal
    (torch/distributed/elastic/multiprocessing/subprocess_handler), so a SIGKILLed torchrun leaves
    them running (seen with torch 2.13: both workers alive 10 s after `kill -9` of torchrun); ours die
    with the launcher (`die_with_launcher`), and it needs no rendezvous server.

    - A rank that fails takes the others down at once (SIGTERM, SIGKILL 15 s later), so a dead rank
      never leaves its peers hanging in a collective.
    - Ctrl-C or SIGTERM to the launcher: the ranks (which got Ctrl-C from the terminal too, or SIGTERM
      from here) stop at the end of the step with a checkpoint; the launcher waits for them (up to
      `timeout_s` + 60 s, the collective timeout, then SIGKILL). A second signal forwards SIGINT: the
      ranks stop at once, without a checkpoint, and SIGKILL follows 15 s later.
    Returns 0, the stop code (130/143) or the first failing rank's code."""
    import signal
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = {**os.environ, CHILD_ENV: "1", PARENT_ENV: str(os.getpid()), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain.launch", *argv], env=env))

    signals: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}

    def send(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    deadline = math.inf  # when the ranks still alive get SIGKILL
    forwarded = 0
    first_failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if first_failure is None:
                failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, *STOPPED_CODES)]
                if failed:
                    first_failure = failed[0]
                    log.error("rank %d exited with code %d: stopping the other ranks", *first_failure)
                    send(signal.SIGTERM)
                    deadline = min(deadline, time.monotonic() + 15)
            if len(signals) > forwarded:
                forwarded = len(signals)
                send(signal.SIGTERM if forwarded == 1 else signal.SIGINT)
                deadline = min(deadline, time.monotonic() + (timeout_s + 60 if forwarded == 1 else 15))
            if time.monotonic() > deadline:
                log.error("ranks still running after being stopped: killing them")
                send(signal.SIGKILL)
                deadline = math.inf
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [first_failure[1]] if first_failure is not None else [p.returncode for p in procs]
    if first_failure is None and signals and all(c in (0, *STOPPED_CODES) for c in codes):
        # stopped on request: the status of the signal this launcher got (130 for Ctrl-C), whichever of the
        # terminal's SIGINT or the forwarded SIGTERM each rank handled first
        return 128 + signals[0]
    code = next((c for c in codes if c != 0), 0)
    return 128 - code if code < 0 else code  # a rank a signal ended: 128 + its number, as a shell says


def mlflow_ui_hint(uri: str) -> str:
    """How to look at the runs of store `uri`: a tracking server is already a UI (open its address);
    a local store needs `mlflow ui` started on it."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1"


def next_steps(cfg: Config, run_dir: Path) -> str:
    """The commands to run next on the run just made: evaluate, generate, export, compare, look."""
    run = shlex.quote(str(run_dir))
    if cfg.data.source.startswith("task:"):  # a real validation prompt of the task, answer left out
        task = get_task(cfg.data.source.removeprefix("task:"))
        example = task.example("val", 0, cfg.data.task.seed, cfg.data.task)
        answer_len = len(example.answer)
        prompt = example.prompt
        generate = f"--prompt {shlex.quote(prompt)} --max-new-tokens {answer_len}"
    else:
        generate = "--prompt 'The' --max-new-tokens 64"
    lines = [
        "next:",
        f"  evaluate:  python -m pretrain.evaluate --run {run}",
        f"  generate:  python -m pretrain.generate --run {run} {generate}",
        f"  export:    python -m pretrain.convert {run} --hf {shlex.quote(f'hf/{run_dir.name}')}",
    ]
    if cfg.tracking.enabled:
        lines += [
            f"  compare:   python -m pretrain.compare --uri {shlex.quote(cfg.tracking.uri)} "
            f"--experiment {shlex.quote(cfg.tracking.experiment)}",
            f"  MLflow:    {mlflow_ui_hint(cfg.tracking.uri)}",
        ]
    return "\n".join(lines)


# The Slurm backend lives in slurm/, the layer above pretrain: named, resolved only when a run may go
# there (common/plugins.py), so pretrain never imports slurm. The module provides
# choose_backend(cfg) -> (backend, why) and launch(cfg, run_dir, run_name, *, dry_run, wait, log_level) -> int
SLURM_BACKEND = "slurm.submit"


def choose_backend(cfg: Config) -> tuple[str, str]:
    """`local` or `slurm` (and why); `auto` asks Slurm only when the job does not fit here."""
    if cfg.launch.backend == "local":
        return "local", "launch.backend"
    return load_plugin(f"{SLURM_BACKEND}:choose_backend", f"launch.backend={cfg.launch.backend}")(cfg)


def launch_slurm(cfg: Config, args: argparse.Namespace) -> int:
    """Submit (or with --dry-run describe) the Slurm job; Slurm's refusals are reported, not raised."""
    launch = load_plugin(f"{SLURM_BACKEND}:launch", "launch.backend=slurm")
    return launch(cfg, run_dir_for(cfg), run_name_for(cfg), dry_run=args.dry_run, wait=args.wait,
                  log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    topology = from_env()
    is_child = os.environ.get(CHILD_ENV) == "1"
    if is_child:
        die_with_launcher()
    setup_logging(args.log_level, topology.rank)
    try:
        cfg = load_config(args.config, args.overrides)
        name_the_run(cfg, args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    console = ConsoleLog()
    if topology.is_rank0 and not is_child:
        console.say(f"# resolved config ({args.config})\n{to_yaml(cfg)}")
        try:
            backend, why = choose_backend(cfg)
        except RuntimeError as e:  # slurm.cluster.SlurmError
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            check_data_sources(cfg)
        except ValueError as e:  # DataSourceError: the message names the key and the path
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            change = resume_changes(cfg, run_dir_for(cfg))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        console.say(f"# plan\n{plan(cfg)}\n" + (f"this run {change}\n" if change else ""))
        if cfg.launch.backend == "auto":
            console.say(f"backend auto -> {backend}: {why}\n")
        if backend == "slurm":
            return launch_slurm(cfg, args)
    if args.dry_run:
        return 0

    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if topology.is_rank0:
        console.open(run_dir, topology.rank)
    try:
        return _run(cfg, args, argv, run_dir, topology, is_child, console)
    finally:
        console.close()
        if is_child:
            # The run is over; what is left is the interpreter's exit, which gives signals with a Python
            # handler back to their default action first: a late SIGTERM from the launcher would then turn
            # this rank's status into -15. Ignored signals stay ignored (the launcher's SIGKILL still ends
            # a rank that hangs here).
            import signal

            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)


def _run(cfg: Config, args: argparse.Namespace, argv: list[str], run_dir: Path, topology, is_child: bool,
         console: ConsoleLog) -> int:
    """Train (or spawn the ranks that train) and print how it ended."""
    try:
        if topology.is_rank0 and not is_child:
            save_config(cfg, run_dir / "config.yaml")
            if cfg.tracking.enabled:
                prepare_store(cfg.tracking.uri)  # create/migrate a local store once, before ranks use it
            if cfg.launch.nproc > 1:
                ensure_shards(cfg.data)  # build once here, not once per rank
                return spawn_local(argv, cfg.launch.nproc, cfg.parallel.timeout_s)
        if is_child:
            # A rank keeps its stop handlers to the end: the launcher forwards its Ctrl-C as SIGTERM, and
            # that copy may land after this rank has stopped (checkpoint written); train() would have given
            # SIGTERM back to its default action by then, which kills the rank mid-shutdown (exit 143, no
            # resume line). Never uninstalled here: the process ends with the run.
            flag = StopFlag().install()
            summary = train(cfg, run_dir, run_name_for(cfg), stop_flags=(flag,), stop_signals=())
        else:
            summary = train(cfg, run_dir, run_name_for(cfg))
    except (ConfigError, DataSourceUnavailable, DataSourceError, TokenizerError, ShardFormatError) as e:
        # bad input: the message names the file, shard or key and what to do; no traceback needed
        console.say(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError) as e:
        console.say(f"error: {e}", file=sys.stderr)
        return 1
    except (Stopped, KeyboardInterrupt) as e:  # Ctrl-C/SIGTERM: no traceback, one line on how to go on
        if topology.is_rank0:
            resume = f"python -m pretrain.launch {shlex.join(argv)}"
            try:
                latest = latest_checkpoint(run_dir, checksums=False)
            except CheckpointError:
                latest = None
            what = (f"{e}" if isinstance(e, Stopped) else "interrupted at once (second Ctrl-C), this step not saved")
            console.say(f"\n{what}; resume from {latest or 'the start (no checkpoint yet)'} with: {resume}",
                        file=sys.stderr)
        return e.exit_code if isinstance(e, Stopped) else 130
    if topology.is_rank0:
        console.say(
            f"\ndone: {summary['steps']} steps, {summary['tokens']:,} tokens on {summary['device']} ({summary['dtype']}), "
            f"layout {summary['layout']}\n"
            f"validation NLL: {summary['initial_val_nll']:.4f} at step 0 -> {summary['final_val_nll']:.4f} "
            f"nats/token (best {summary['best_val_nll']:.4f})\n"
            f"checkpoint: {summary['checkpoint']}\n"
            f"run dir: {run_dir}\n"
            f"MLflow: {cfg.tracking.uri if cfg.tracking.enabled else 'off'}\n"
            f"{next_steps(cfg, run_dir)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
