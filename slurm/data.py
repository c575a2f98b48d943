"""`python -m data_pipeline.build ... --slurm K`: a preparation job (tokenizer training, density
statistics, plan: `--prepare`), then the shard build as a Slurm job array over `--part i/K` that
starts once it succeeded (each part loads what it prepared instead of training its own), then a
small job that merges the indexes once every part succeeded (`--dependency=afterok` each time).

Resources come from the recipe's `launch.slurm` section (partition, account, qos, time limit,
cpus_per_task = tokenizing workers per part, setup lines, array_parallelism); `--set launch.slurm.KEY=V`
overrides them. Each array task and the merge run from a snapshot of the code taken at submit time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.config_file import ConfigError, merge_layers, read_layers
from data_pipeline.build import build, ensure_shards, merge, prepare_build, resolve_shard_dir, summary
from data_pipeline.config import DataConfig, load_data_config
from pretrain.config import SlurmConfig, slurm_problems
from slurm.cluster import SlurmError, refuse_if_hopeless
from slurm.executor import (
    executor_parameters,
    make_executor,
    sbatch_header,
    snapshot_code,
    snapshot_dir,
    snapshot_setup,
    submit,
    submit_array,
)
from slurm.submit import wait_for


def load_slurm_config(path: str | None, overrides: list[str]) -> SlurmConfig:
    """The `launch.slurm` section of a run recipe (its `inherit:` chain followed) plus launch.slurm.* overrides."""
    layers = []
    for origin, data in read_layers(path, overrides):
        section = ((data.get("launch") or {}) if isinstance(data, dict) else {}).get("slurm") or {}
        if section:
            layers.append((origin, section))
    cfg = merge_layers(SlurmConfig, layers, prefix="launch.slurm.")
    problems = slurm_problems(cfg, 1)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def prepare_parts(cfg: DataConfig, workers: int | None) -> str:
    """The first job: the tokenizer, density statistics and plan that every part then loads."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    return f"prepared {prepare_build(cfg, workers=workers)}"


def _after(job_id: str) -> dict:
    return {"slurm_additional_parameters": {"dependency": f"afterok:{job_id}", "kill-on-invalid-dep": "yes"}}


def build_part(cfg: DataConfig, part: int, n_parts: int, workers: int | None) -> str:
    """One array task: the shards of part `part` of `n_parts`."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    report = build(cfg, workers=workers, part=part, n_parts=n_parts, progress=False)
    return f"part {part}/{n_parts} of {report.shard_dir} in {report.seconds:.1f} s"


def merge_parts(cfg: DataConfig) -> str:
    """The dependent job: every split's index once all parts exist."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    merge(resolve_shard_dir(cfg))
    return summary(ensure_shards(cfg, progress=False))


def submit_build(cfg: DataConfig, slurm: SlurmConfig, n_parts: int, workers: int | None = None,
                 dry_run: bool = False, wait: bool = False) -> int:
    shard_dir = resolve_shard_dir(cfg).resolve()
    cfg.shard_dir = str(shard_dir)  # pin the output directory (the default one is relative to the cwd)
    folder = Path(slurm.folder).expanduser().resolve() if slurm.folder else shard_dir.parent / f".slurm-{shard_dir.name}"
    name = f"build-{shard_dir.name}"
    workers = workers or slurm.cpus_per_task
    code = snapshot_dir(folder) if slurm.snapshot else None
    array = executor_parameters(slurm, nodes=1, tasks_per_node=1, gpus_per_node=0, name=name,
                                setup=snapshot_setup(code), slurm_array_parallelism=slurm.array_parallelism)
    if dry_run:
        print("# build array: submitit parameters\n" + "\n".join(f"{k}: {v!r}" for k, v in array.items()))
        print(f"# a preparation job (tokenizer, density statistics), then {n_parts} array tasks "
              "(--dependency=afterok:<preparation job id>), then a merge job (--dependency=afterok:<array job id>)")
        print("# equivalent sbatch header (array)\n" + sbatch_header({**array, "slurm_map_count": n_parts}, folder))
        return 0
    if code is not None:
        snapshot_code(code)
    single = {k: v for k, v in array.items() if k != "slurm_array_parallelism"}
    prep_job = submit(make_executor(folder, {**single, "name": f"prepare-{shard_dir.name}"},
                                    max_requeues=slurm.max_requeues), prepare_parts, cfg, workers)
    refuse_if_hopeless(prep_job.job_id, prep_job.paths.submission_file)
    executor = make_executor(folder, {**array, **_after(prep_job.job_id)}, max_requeues=slurm.max_requeues)
    jobs = submit_array(executor, build_part, [cfg] * n_parts, range(n_parts), [n_parts] * n_parts,
                        [workers] * n_parts)
    array_id = jobs[0].job_id.split("_")[0]  # pending on its dependency: the preparation job was checked
    merge_params = {**single, "name": f"merge-{shard_dir.name}", "cpus_per_task": 1, **_after(array_id)}
    merge_job = submit(make_executor(folder, merge_params, max_requeues=slurm.max_requeues), merge_parts, cfg)
    print(f"submitted build array {array_id} ({n_parts} parts of {shard_dir}; starts when preparation job "
          f"{prep_job.job_id} succeeded) and merge job {merge_job.job_id} (starts when every part succeeded)\n"
          f"logs:   {folder}/{prep_job.job_id}_0_log.out|err, {folder}/{array_id}_<part>_0_log.out|err, "
          f"{folder}/{merge_job.job_id}_0_log.out|err\n"
          f"follow: squeue -j {prep_job.job_id},{array_id},{merge_job.job_id}   |   "
          f"cancel: scancel {prep_job.job_id} {array_id} {merge_job.job_id}",
          flush=True)
    if not wait:
        return 0
    code_ = wait_for(prep_job.job_id, Path(folder) / f"{prep_job.job_id}_0_log.err")
    if code_:
        return code_
    for job in jobs:
        code_ = wait_for(job.job_id, Path(folder) / f"{job.job_id}_0_log.err")
        if code_:
            return code_
    code_ = wait_for(merge_job.job_id, Path(folder) / f"{merge_job.job_id}_0_log.err", merge_job.result)
    if code_ == 0:
        print(merge_job.result(), flush=True)
    return code_


def main_slurm(config: str | None, overrides: list[str], n_parts: int, workers: int | None, dry_run: bool,
               wait: bool) -> int:
    """What `data_pipeline.build --slurm K` runs (after its own argument parsing)."""
    try:
        slurm = load_slurm_config(config, [o for o in overrides if o.strip().startswith("launch.slurm.")])
        cfg = load_data_config(config, [o for o in overrides if not o.strip().startswith("launch.slurm.")])
        return submit_build(cfg, slurm, n_parts, workers=workers, dry_run=dry_run, wait=wait)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
