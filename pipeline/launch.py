"""Submit a run to SLURM through submitit, and find its jobs again.

    job = submit(load_config("configs/diffullama-7b.yaml"))     # a submitit Job
    print(dry_run(cfg))                                          # the sbatch script, not submitted

One SLURM task per rank (``parallel.nnodes`` x ``parallel.nproc_per_node``): each task turns
SLURM's environment into torch.distributed's (``pipeline.distributed.export_slurm_ranks``) and
runs the run's training stages in-process, each resuming from its latest checkpoint. Near the
time limit SLURM signals the job; submitit then asks :meth:`TrainingJob.checkpoint` for the
submission to requeue, up to ``slurm.max_requeues`` times, and the requeued job resumes from
the last periodic save. A preempted job (SIGTERM, then killed) is requeued by SLURM itself and
resumes the same way. Everything a job leaves lands in ``runs/<name>/``: the resolved config,
``slurm/jobs.jsonl`` (one line per submission: job id, git revision, log paths) and
``slurm/<job id>/`` (submitit's pickles and the logs of every task).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from pipeline import checkpoint
from pipeline.config import RunConfig, save_config
from pipeline.pretrain import finish_run, finished_checkpoint, training_stages

_REPO = Path(__file__).resolve().parents[1]


class LaunchError(RuntimeError):
    """The job cannot run on this cluster as configured; the message names the setting."""


# ---------------------------------------------------------------------------------------
# What runs in every task


def _flag_sigterm() -> threading.Event:
    """An event set when SIGTERM (SLURM's preemption notice) arrives; the handler already
    installed (submitit's, which lets the job run on) still runs."""
    received = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        received.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    return received


class TrainingJob(Checkpointable):
    """The callable every SLURM task runs: all training stages, then (global rank 0) the loss
    curves, the export and samples. Safe to run again: finished stages are skipped, others
    resume."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def __call__(self) -> str:
        environment = submitit.JobEnvironment()
        # A result left by an earlier attempt of this job (one preempted while finishing) would
        # tell the submitter this attempt is over before it is.
        if environment.global_rank == 0:
            environment.paths.result_pickle.unlink(missing_ok=True)
        preempted = _flag_sigterm()
        try:
            return self._run(environment.global_rank)
        except BaseException:
            if not preempted.is_set():
                raise
            # SIGTERM also ended helper processes (the checkpoint writer's), so the step or
            # save that failed is preemption's doing: leave no result, SLURM requeues the job
            # and it resumes from the last complete checkpoint.
            print("preempted: exiting for SLURM to requeue the job", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGTERM)

    def _run(self, rank: int) -> str:
        from pipeline.distributed import export_slurm_ranks
        from pipeline.train import train

        export_slurm_ranks()
        first_port = int(os.environ["MASTER_PORT"])
        stages = training_stages(self.cfg)
        for index, (stage, stage_dir) in enumerate(stages):
            if finished_checkpoint(stage, stage_dir) is not None:
                continue
            if rank == 0:
                save_config(stage, stage_dir / "config.yaml")
            # A process group of its own per stage, on a port of its own: the previous stage's
            # rendezvous store may still hold its port in this process.
            os.environ["MASTER_PORT"] = str(first_port + index)
            train(stage, stage_dir)
        final = checkpoint.latest_checkpoint(stages[-1][1] / "checkpoints")
        if rank == 0:
            finish_run(self.cfg, stages)
        return str(final)

    def checkpoint(self) -> DelayedSubmission:
        # Nothing is saved here: a save is a collective of all ranks, and the signal reaches
        # each task at a different point of its step. The requeued job resumes from the last
        # periodic save (train.save_interval), so at most that many steps are redone.
        return DelayedSubmission(TrainingJob(self.cfg))


# ---------------------------------------------------------------------------------------
# sbatch parameters and checks against the cluster


def sbatch_parameters(cfg: RunConfig) -> dict:
    """The run's submitit SlurmExecutor parameters (sbatch options)."""
    s = cfg.slurm
    params: dict = {
        "job_name": cfg.name,
        "nodes": cfg.parallel.nnodes,
        "ntasks_per_node": cfg.parallel.nproc_per_node,
        "cpus_per_task": s.cpus_per_task,
        "time": s.time_limit_minutes,
        "signal_delay_s": s.signal_delay_s,
        "setup": list(s.setup),
    }
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos,
                "constraint": s.constraint, "gpus_per_node": s.gpus_per_node or None,
                "mem": f"{s.mem_gb}GB" if s.mem_gb else None, "exclusive": s.exclusive or None}
    params.update({key: value for key, value in optional.items() if value is not None})
    # A requeued job writes to the same log files: append instead of truncating them.
    extra = {"open-mode": "append"}
    for option in s.sbatch_options:
        key, _, value = option.lstrip("-").partition("=")
        extra[key] = value if value else True
    params["additional_parameters"] = extra
    return params


def slurm_available() -> bool:
    """sbatch is installed and a controller answers."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                              timeout=10).stdout.count("UP") > 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class PartitionNode:
    name: str
    cpus: int
    memory_mb: int
    gpus: int


def _sinfo(*args: str) -> list[str]:
    result = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise LaunchError(f"sinfo {' '.join(args)}: {result.stderr.strip()}")
    return [line for line in result.stdout.splitlines() if line.strip()]


def _gpus_in_gres(gres: str) -> int:
    """'gpu:8', 'gpu:a100:4(S:0-1)', 'gpu:2,nic:1' -> GPUs per node; '(null)' -> 0."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,()]+)?:(\d+)", gres))


def sinfo_minutes(limit: str) -> Optional[int]:
    """sinfo's time limit ('infinite', '30:00', '4:00:00', '2-00:00:00') in minutes."""
    if limit in ("infinite", "n/a", "UNLIMITED"):
        return None
    days, _, clock = limit.rpartition("-")
    fields = [int(f) for f in clock.split(":")]
    hours, minutes = (fields[0], fields[1]) if len(fields) == 3 else (0, fields[0])
    return int(days or 0) * 1440 + hours * 60 + minutes


def check_cluster(cfg: RunConfig) -> str:
    """Refuse, before submitting, what the cluster cannot run; returns the partition used."""
    s, p = cfg.slurm, cfg.parallel
    partitions = {line.split()[0].rstrip("*"): line.split()[0].endswith("*")
                  for line in _sinfo("-o", "%P")}
    if s.partition is None:
        defaults = [name for name, is_default in partitions.items() if is_default]
        if not defaults:
            raise LaunchError("slurm.partition: the cluster has no default partition; name one "
                              f"of {sorted(partitions)}")
        partition = defaults[0]
    elif s.partition not in partitions:
        raise LaunchError(f"slurm.partition: unknown partition {s.partition!r} (this cluster "
                          f"has {', '.join(sorted(partitions))})")
    else:
        partition = s.partition
    nodes = {}
    for line in _sinfo("-N", "-p", partition, "-o", "%N %c %m %G"):
        name, cpus, memory, gres = line.split()
        nodes[name] = PartitionNode(name, int(cpus.rstrip("+")), int(memory.rstrip("+")), _gpus_in_gres(gres))
    fitting = [n for n in nodes.values()
               if n.gpus >= s.gpus_per_node and n.cpus >= p.nproc_per_node * s.cpus_per_task
               and (s.mem_gb is None or n.memory_mb >= s.mem_gb * 1024)]
    if len(fitting) < p.nnodes:
        most_gpus = max((n.gpus for n in nodes.values()), default=0)
        most_cpus = max((n.cpus for n in nodes.values()), default=0)
        if s.gpus_per_node > most_gpus:
            why = (f"slurm.gpus_per_node: {s.gpus_per_node} GPUs per node, but the nodes of "
                   f"partition {partition!r} have at most {most_gpus}")
        elif p.nproc_per_node * s.cpus_per_task > most_cpus:
            why = (f"slurm.cpus_per_task: {p.nproc_per_node} tasks x {s.cpus_per_task} CPUs per "
                   f"node, but the nodes of partition {partition!r} have at most {most_cpus}")
        else:
            why = (f"parallel.nnodes: {p.nnodes} nodes of {s.gpus_per_node} GPUs, "
                   f"{p.nproc_per_node * s.cpus_per_task} CPUs"
                   + (f", {s.mem_gb} GB" if s.mem_gb else "")
                   + f" asked, partition {partition!r} has {len(fitting)} such nodes")
        raise LaunchError(why)
    max_minutes = sinfo_minutes(_sinfo("-p", partition, "-o", "%l")[0].strip())
    if max_minutes is not None and s.time_limit_minutes > max_minutes:
        raise LaunchError(f"slurm.time_limit_minutes: {s.time_limit_minutes} exceeds partition "
                          f"{partition!r}'s limit of {max_minutes} minutes")
    return partition


# ---------------------------------------------------------------------------------------
# Submission and the run's job records


def jobs_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "slurm"


def _submitit_command(folder: Path) -> str:
    # What submitit's SlurmExecutor runs in each task (the dry run shows it without one).
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def dry_run(cfg: RunConfig) -> str:
    """The sbatch script ``submit(cfg)`` would submit (checked against the cluster if any)."""
    from submitit.slurm.slurm import _make_sbatch_string

    if slurm_available():
        check_cluster(cfg)
    folder = (jobs_dir(cfg) / "%j").resolve()
    return _make_sbatch_string(command=_submitit_command(folder), folder=folder, **sbatch_parameters(cfg))


def git_revision() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    revision = git("rev-parse", "HEAD") or "unknown"
    return revision + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def submit(cfg: RunConfig) -> submitit.Job:
    """Check the run against the cluster, prepare its start and data, submit; returns the Job."""
    from pipeline.pretrain import prepare_data

    check_cluster(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    # Tokenizing a shipped corpus (the embedded default) is light: done here, before any node
    # waits on it; real recipes name prepared datasets and skip this.
    if cfg.init.source == "hf":
        from pipeline.hf_import import start_from_hf

        # Converted once, as pretrain does: a single process (ranks would all convert) that
        # needs the Hub or the model folder, which login nodes have and compute nodes may not.
        cfg = start_from_hf(cfg, cfg.run_dir / "import")
    prepare_data(cfg)
    executor = submitit.SlurmExecutor(folder=jobs_dir(cfg) / "%j", max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**sbatch_parameters(cfg))
    job = executor.submit(TrainingJob(cfg))
    record = {
        "job_id": job.job_id,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "config": str(cfg.run_dir / "config.yaml"),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
        "sbatch": str(job.paths.submission_file),
    }
    with (jobs_dir(cfg) / "jobs.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return job


def last_job(cfg: RunConfig) -> dict:
    """The run's most recent submission record."""
    path = jobs_dir(cfg) / "jobs.jsonl"
    if not path.is_file():
        raise LaunchError(f"{cfg.name}: no job submitted yet ({path} does not exist)")
    return json.loads(path.read_text().splitlines()[-1])


def job_state(job_id: str) -> str:
    """SLURM's state of the job (PENDING, RUNNING, COMPLETED, ...), from sacct."""
    result = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                            capture_output=True, text=True, timeout=30)
    states = result.stdout.split()
    return states[-1] if states else "UNKNOWN"


def status_text(job_id: str) -> str:
    result = subprocess.run(
        ["sacct", "-X", "-j", job_id, "-o", "JobID,JobName%20,Partition,State,Elapsed,Timelimit,NNodes,NodeList%30"],
        capture_output=True, text=True, timeout=30,
    )
    return result.stdout + result.stderr


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, timeout=30)
