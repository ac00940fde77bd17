"""Submission to a real SLURM cluster: ``slurm/local_cluster.sh`` brings one up on this machine
(munge, slurmdbd on MariaDB, slurmctld, two slurmd posing as node1 and node2; the ``cluster``
fixture in conftest.py), and the jobs go through ``pipeline.launch`` (submitit) like a user's would."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, torchrun_train, write_tiny_recipe
from pipeline import launch
from pipeline.config import ConfigError, load_config
from pipeline.export import export_to_hf

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

VOCAB = 520


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny recipe's tokenizer and dataset, built once."""
    root = tmp_path_factory.mktemp("slurm-data")
    return write_tiny_recipe(root, VOCAB)


def tiny_run(data: Path, root: Path, *overrides: str):
    """The tiny recipe as a run of its own under ``root``, training from scratch."""
    return load_config(data, [f"output_dir={root}", "init.source=checkpoint", "parallel.nproc_per_node=1",
                              "slurm.time_limit_minutes=10", *overrides])


def wait(job, seconds: float = 240):
    deadline = time.time() + seconds
    while not job.done():
        if time.time() > deadline:
            job.cancel()
            pytest.fail(f"job {job.job_id} not done after {seconds} s:\n{log_tail(job)}")
        time.sleep(0.5)
    return job.results()[0]  # global rank 0's


def final_state(job_id: str, seconds: float = 30) -> str:
    """SLURM's state once the job has left (the result appears while the tasks still exit)."""
    deadline = time.time() + seconds
    while (state := launch.job_state(job_id)) in ("UNKNOWN", "PENDING", "RUNNING", "REQUEUED", "COMPLETING") \
            and time.time() < deadline:
        time.sleep(0.5)
    return state


def log_tail(job) -> str:
    return "".join(p.read_text()[-2000:] for p in (job.paths.stdout, job.paths.stderr) if p.exists())


def losses(stage_dir: Path) -> dict:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def test_tiny_job_completes_with_its_records(cluster, data, tmp_path):
    cfg = tiny_run(data, tmp_path)
    job = launch.submit(cfg)
    final = Path(wait(job))
    assert final == tmp_path / "tiny-test" / "adapt" / "checkpoints" / "iter_0000003"
    assert (final / "manifest.json").is_file()
    assert (tmp_path / "tiny-test" / "export" / "model.safetensors").is_file()
    record = launch.last_job(cfg)
    assert record["job_id"] == job.job_id and len(record["git_revision"]) >= 40
    assert load_config(record["config"]) == cfg
    assert Path(record["stdout"]).is_file()
    assert final_state(job.job_id) == "COMPLETED"


def test_make_pretrain_on_a_login_node_submits_and_the_job_completes(cluster, data, tmp_path):
    overrides = f"output_dir={tmp_path} init.source=checkpoint parallel.nproc_per_node=1 slurm.time_limit_minutes=10"
    made = subprocess.run(["make", "pretrain", f"CONFIG={data}", f"ARGS={overrides}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    job_id = made.stdout.split("submitted job ")[1].split()[0]
    deadline = time.time() + 240
    while final_state(job_id) != "COMPLETED" and time.time() < deadline:
        time.sleep(1)
    assert final_state(job_id) == "COMPLETED"
    assert (tmp_path / "tiny-test" / "export" / "model.safetensors").is_file()
    status = subprocess.run(["make", "status", f"CONFIG={data}", f"ARGS={overrides}"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert job_id in status.stdout


def test_two_nodes_train_together_over_gloo(cluster, data, tmp_path):
    cfg = tiny_run(data, tmp_path, "parallel.nnodes=2")
    job = launch.submit(cfg)
    wait(job)
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job.job_id, "-o", "NodeList"],
                           capture_output=True, text=True).stdout.strip()
    assert nodes == "node[1-2]"
    # Both ranks took part: two tasks' logs, and the trainer checks world size == 2.
    assert {p.name for p in job.paths.folder.glob("*_log.out")} == {f"{job.job_id}_0_log.out", f"{job.job_id}_1_log.out"}
    assert final_state(job.job_id) == "COMPLETED"


def test_preempted_job_resumes_and_ends_like_an_uninterrupted_run(cluster, data, tmp_path):
    steps, save_interval = 200, 20
    overrides = [f"train.steps={steps}", f"train.save_interval={save_interval}", "diffusion.anneal_steps=50",
                 "train.warmup_steps=10", "train.lr=1e-3"]
    cfg = tiny_run(data, tmp_path / "slurm", *overrides)
    job = launch.submit(cfg)
    ckpts = cfg.run_dir / "adapt" / "checkpoints"
    deadline = time.time() + 180
    while not (ckpts / "latest").is_file():
        assert time.time() < deadline and not job.done(), f"no checkpoint appeared:\n{log_tail(job)}"
        time.sleep(0.1)
    preempted_at = (ckpts / "latest").read_text()
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True)
    final = Path(wait(job))
    log = Path(job.paths.stdout).read_text()
    assert "resumed from" in log, f"the requeued job did not resume (preempted after {preempted_at}):\n{log[-2000:]}"
    assert final.name == f"iter_{steps:07d}"

    straight_dir = tmp_path / "straight"
    torchrun_train(data, straight_dir, 1, "init.source=checkpoint", *overrides)
    assert losses(straight_dir) == losses(cfg.run_dir / "adapt")
    a = load_file(export_to_hf(cfg, straight_dir / "checkpoints", tmp_path / "hf_straight") / "model.safetensors")
    b = load_file(cfg.run_dir / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_hung_job_is_requeued_by_its_watchdog_until_max_requeues(cluster, tmp_path):
    # The watchdog the training loop runs, in a job that never makes progress.
    script = tmp_path / "hang.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --output={tmp_path}/hang.log
#SBATCH --open-mode=append
#SBATCH --time=5
echo "attempt ${{SLURM_RESTART_COUNT:-0}}"
cd {REPO}
exec {sys.executable} -c "
import time
from pipeline.watchdog import HangWatchdog
HangWatchdog(timeout_s=2, rank=0, max_requeues=1).progress('step 7')
time.sleep(600)
"
""")
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True,
                            text=True).stdout.strip()
    assert final_state(job_id, seconds=300) == "FAILED"
    log = (tmp_path / "hang.log").read_text()
    assert "attempt 0" in log and "attempt 1" in log and "attempt 2" not in log
    assert log.count("no progress for") == 2 and "in step 7" in log
    assert f"requeued SLURM job {job_id} (restart 1 of at most 1)" in log
    assert f"slurm.max_requeues: job {job_id} was requeued 1 times already" in log
    exit_code = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "ExitCode"],
                               capture_output=True, text=True).stdout.split()[-1]
    assert exit_code == "75:0"


@pytest.mark.parametrize("overrides, message", [
    (["slurm.partition=nosuch"], "slurm.partition: unknown partition 'nosuch'"),
    (["slurm.gpus_per_node=1"], "slurm.gpus_per_node: 1 GPUs per node, but the nodes of partition 'debug' have at most 0"),
    (["parallel.nnodes=4", "train.micro_batch_size=2"], "parallel.nnodes: 4 nodes .* partition 'debug' has 2 such nodes"),
])
def test_what_the_cluster_cannot_run_is_refused_before_submission(cluster, data, tmp_path, overrides, message):
    cfg = tiny_run(data, tmp_path, *overrides)
    with pytest.raises(launch.LaunchError, match=message):
        launch.submit(cfg)
    assert not launch.jobs_dir(cfg).exists()


def test_a_time_limit_below_one_checkpoint_interval_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="shorter than one checkpoint interval"):
        tiny_run(data, tmp_path, "train.save_interval=100", "slurm.expected_step_seconds=6")


def test_dry_run_shows_every_setting(data, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "slurm_available", lambda: False)  # no cluster to check against
    cfg = tiny_run(data, tmp_path, "slurm.account=lab", "slurm.qos=high", "slurm.constraint=h100",
                   "slurm.mem_gb=64", "slurm.exclusive=true", "slurm.cpus_per_task=8",
                   "slurm.sbatch_options=[mail-type=END, reservation=big]", "slurm.setup=[module load cuda]")
    script = launch.dry_run(cfg)
    for line in ("--account=lab", "--qos=high", "--constraint=h100", "--mem=64GB", "--exclusive",
                 "--cpus-per-task=8", "--mail-type=END", "--reservation=big", "--open-mode=append",
                 "--time=10", "--ntasks-per-node=1", "module load cuda"):
        assert line in script, line
