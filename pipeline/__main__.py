"""Command line: ``python -m pipeline pretrain --config configs/tiny.yaml [key=value ...]``, and
the run's SLURM jobs: ``submit [--dry-run]``, ``status``, ``logs``, ``cancel`` (same arguments)."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="run a recipe end to end on this machine")
    pretrain.add_argument("--config", default="configs/tiny.yaml")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value")
    submit = commands.add_parser("submit", help="submit the recipe to SLURM (submitit)")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script only")
    for name, text in (("status", "the run's last SLURM job"), ("logs", "the last job's log tails"),
                       ("cancel", "cancel the run's last SLURM job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--job", help="a job id instead of the run's last one")
        if name == "logs":
            command.add_argument("--lines", type=int, default=40)
    for command in commands.choices.values():
        if command is not pretrain:
            command.add_argument("--config", default="configs/tiny.yaml")
            command.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command != "pretrain":
        return slurm_command(args, cfg)
    from pipeline.pretrain import pretrain as run_pretrain

    run_pretrain(cfg)
    return 0


def slurm_command(args, cfg) -> int:
    """submit / status / logs / cancel: the run's jobs on SLURM (pipeline.launch)."""
    from pipeline import launch

    try:
        if args.command == "submit":
            if args.dry_run:
                print(launch.dry_run(cfg))
                return 0
            job = launch.submit(cfg)
            record = launch.last_job(cfg)
            print(f"submitted job {job.job_id} ({cfg.name}): logs {record['stdout']} and "
                  f"{record['stderr']}\n  make status|logs|cancel CONFIG={args.config}")
            return 0
        job_id = args.job or launch.last_job(cfg)["job_id"]
        if args.command == "status":
            print(launch.status_text(job_id), end="")
        elif args.command == "logs":
            folder = launch.jobs_dir(cfg) / job_id
            for path in sorted(folder.glob("*_log.out")) + sorted(folder.glob("*_log.err")):
                lines = path.read_text(errors="replace").splitlines()[-args.lines:]
                print(f"==> {path} <==", *lines, sep="\n")
        else:
            launch.cancel(job_id)
            print(f"cancelled job {job_id}")
    except launch.LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
