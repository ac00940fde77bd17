"""Tokenize a corpus across SLURM nodes: one array task per input, then a merge job.

    build = submit_build(["corpus/*.jsonl.gz"], "tokenizer/", "data/corpus", partition="cpu")
    summary = wait_for_build(build)     # the merged dataset's verify summary

Array task k turns input k into `<prefix>.part-0000k.bin/.idx` (build.build_indexed_dataset,
which keeps a part that exists and verifies); the merge job, started by SLURM once every task
has succeeded, joins the parts in input order into `<prefix>.bin/.idx`, byte-identical to a
build of all inputs in one process. If a task fails or runs out of time, the merge is
cancelled; submitting again rebuilds only the parts that are missing or damaged.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass

import submitit

from data_prep.build import build_indexed_dataset, remove_stale_temp_files
from data_prep.corpus import DataPrepError, expand_paths, is_hub_input
from data_prep.shards import merge_shards
from data_prep.tokenizer import load_tokenizer
from pipeline.launch import sinfo_minutes


def part_prefix(output_prefix: str, index: int) -> str:
    return f"{output_prefix}.part-{index:05d}"


def build_part(path: str, tokenizer: str, prefix: str, text_field: str, workers: int) -> dict:
    """What array task runs: one input into one part."""
    remove_stale_temp_files(prefix)
    return build_indexed_dataset([path], load_tokenizer(tokenizer), prefix, text_field=text_field, workers=workers)


def merge_parts(parts: list[str], output_prefix: str) -> dict:
    """What the merge job runs."""
    remove_stale_temp_files(output_prefix)
    return merge_shards(parts, output_prefix)


@dataclass
class SubmittedBuild:
    inputs: list[str]
    parts: list[str]  # part prefixes, in input order
    array_job_id: str
    part_jobs: list[submitit.Job]  # the array's tasks, in input order
    merge_job: submitit.Job
    log_folder: str


def _sinfo(*args: str) -> list[str]:
    try:
        result = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise DataPrepError("SLURM: sinfo did not answer in 30 s; is the controller up?") from None
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        raise DataPrepError(f"SLURM: sinfo {' '.join(args)} failed: {lines[-1] if lines else result.returncode}")
    return [line.split() for line in result.stdout.splitlines() if line.strip()]


def check_cluster(partition: str | None, cpus_per_task: int, time_limit_minutes: int) -> str:
    """Refuse, before submitting, what the cluster cannot run; returns the partition used."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise DataPrepError("SLURM: sbatch/sinfo not found; submit from a SLURM login node")
    limits = {}
    default = None
    for name, limit in _sinfo("-o", "%P %l"):
        if name.endswith("*"):
            name = default = name.rstrip("*")
        limits[name] = sinfo_minutes(limit)
    if partition is None:
        if default is None:
            raise DataPrepError(f"partition: the cluster has no default partition; name one of {', '.join(limits)}")
        partition = default
    elif partition not in limits:
        raise DataPrepError(f"partition: unknown partition {partition!r} (this cluster has {', '.join(limits)})")
    most_cpus = max(int(cpus.rstrip("+")) for (cpus,) in _sinfo("-N", "-p", partition, "-o", "%c"))
    if cpus_per_task > most_cpus:
        raise DataPrepError(
            f"cpus_per_task: {cpus_per_task}, but the nodes of partition {partition!r} have at most {most_cpus} CPUs"
        )
    if limits[partition] is not None and time_limit_minutes > limits[partition]:
        raise DataPrepError(
            f"time_limit_minutes: {time_limit_minutes} exceeds partition {partition!r}'s limit "
            f"of {limits[partition]} minutes"
        )
    return partition


def submit_build(
    inputs: list[str],
    tokenizer: str,
    output_prefix: str,
    text_field: str = "text",
    workers: int = 1,
    partition: str | None = None,
    cpus_per_task: int | None = None,
    time_limit_minutes: int = 60,
    array_parallelism: int = 64,
    log_folder: str | None = None,
) -> SubmittedBuild:
    """Submit one array task per input (globs expanded, sorted) and the merge job after them.

    `workers` tokenizer processes per task on `cpus_per_task` CPUs (default: `workers`); at
    most `array_parallelism` tasks run at once. Submitit's pickles and every task's logs go
    under `log_folder` (default `<output_prefix>.slurm/`).
    """
    if not inputs:
        raise DataPrepError("inputs: none given")
    files = [path if is_hub_input(path) else os.path.abspath(path) for path in expand_paths(inputs)]
    cpus_per_task = workers if cpus_per_task is None else cpus_per_task
    counts = {
        "workers": workers,
        "cpus_per_task": cpus_per_task,
        "time_limit_minutes": time_limit_minutes,
        "array_parallelism": array_parallelism,
    }
    for name, value in counts.items():
        if value < 1:
            raise DataPrepError(f"{name}: must be at least 1, got {value}")
    if workers > cpus_per_task:
        raise DataPrepError(f"workers: {workers} tokenizer processes on cpus_per_task={cpus_per_task} CPUs")
    load_tokenizer(tokenizer)  # a bad tokenizer fails here, not in every task
    if os.path.isdir(tokenizer):
        tokenizer = os.path.abspath(tokenizer)  # the tasks may start elsewhere
    partition = check_cluster(partition, cpus_per_task, time_limit_minutes)

    output_prefix = os.path.abspath(output_prefix)
    log_folder = os.path.abspath(log_folder or f"{output_prefix}.slurm")
    parts = [part_prefix(output_prefix, index) for index in range(len(files))]

    executor = submitit.SlurmExecutor(folder=os.path.join(log_folder, "%j"))
    common = {"partition": partition, "time": time_limit_minutes, "nodes": 1, "ntasks_per_node": 1}
    executor.update_parameters(
        job_name="data_prep-build", cpus_per_task=cpus_per_task, array_parallelism=array_parallelism, **common
    )
    with executor.batch():
        part_jobs = [
            executor.submit(build_part, path, tokenizer, part, text_field, workers) for path, part in zip(files, parts)
        ]
    array_id = part_jobs[0].job_id.split("_")[0]
    # afterok on the array id waits for every task; if one fails the dependency can never be
    # met, and kill-on-invalid-dep cancels the merge instead of leaving it pending forever.
    executor.update_parameters(
        job_name="data_prep-merge",
        cpus_per_task=1,
        dependency=f"afterok:{array_id}",
        additional_parameters={"kill-on-invalid-dep": "yes"},
        **common,
    )
    merge_job = executor.submit(merge_parts, parts, output_prefix)
    return SubmittedBuild(files, parts, array_id, part_jobs, merge_job, log_folder)


def _failure(job: submitit.Job) -> str | None:
    """Why a finished job failed, in one line, or None if it succeeded."""
    error = job.exception()
    if error is None:
        return None
    # A task's exception comes back as its traceback between two dash lines; its last line
    # names the error. A job killed by SLURM (time limit, cancelled) left no traceback.
    pieces = str(error).split("-" * 22)
    cause = pieces[1].strip().splitlines()[-1] if len(pieces) >= 3 and pieces[1].strip() else f"ended {job.state}"
    return f"{cause} (log: {job.paths.stderr})"


def wait_for_build(build: SubmittedBuild) -> dict:
    """Wait for every task and the merge; return the merged dataset's summary."""
    for path, job in zip(build.inputs, build.part_jobs):
        if (failure := _failure(job)) is not None:
            raise DataPrepError(f"{path}: array task {job.job_id} failed: {failure}")
    if (failure := _failure(build.merge_job)) is not None:
        raise DataPrepError(f"merge job {build.merge_job.job_id} failed: {failure}")
    return build.merge_job.result()
