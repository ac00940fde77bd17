"""torch.distributed and Megatron-Core parallel state for one training process.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or,
for a process that ``srun`` started directly (one task per rank), from SLURM's.
NCCL on GPUs, gloo on CPU; without CUDA the CPU mapping of ``megatron_ext.cpu_compat`` is
applied before any Megatron-Core model code runs.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from pipeline.config import RunConfig


def init_distributed(cfg: RunConfig) -> None:
    if not torch.cuda.is_available():
        from megatron_ext.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    if not dist.is_initialized():
        export_slurm_ranks()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.train.hang_timeout_minutes))
    if cfg.parallel.distributed_optimizer and dist.get_backend() == "gloo" and cfg.data_parallel_size > 1:
        raise RuntimeError("parallel.distributed_optimizer: needs NCCL (GPUs); gloo has no reduce-scatter")
    if dist.get_world_size() != cfg.world_size:
        raise RuntimeError(
            f"parallel: the launcher started {dist.get_world_size()} processes but the config "
            f"asks for nnodes x nproc_per_node = {cfg.world_size}"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=cfg.parallel.pp,
        context_parallel_size=cfg.parallel.cp,
    )
    # The same global seed on every rank: CPU-initialised master weights are then identical
    # whatever the parallel layout (Megatron splits them after drawing).
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)


def export_slurm_ranks() -> None:
    """Under ``srun`` without torchrun, turn SLURM_PROCID / NTASKS / LOCALID / JOB_NODELIST into
    the RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT that env:// reads; the master
    is the allocation's first node and the port derives from the job id (the same on every task).
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # submitit reads SLURM's variables once it knows it is under SLURM (a submitit job already is).
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    # Every task keeps all of its node's GPUs visible: init_distributed picks one by LOCAL_RANK.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def shutdown_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    """The last pipeline stage's first rank: it holds the loss."""
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def on_rank0(compute):
    """``compute()`` run on global rank 0 only (it reads files every rank would otherwise
    read at once), its result shared with every rank."""
    result = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(result, src=0)
    return result[0]
