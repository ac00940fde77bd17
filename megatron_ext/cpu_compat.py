"""Run Megatron-Core on a machine without CUDA.

Megatron-Core assumes a GPU: it creates tensors with ``device='cuda'`` or
``torch.cuda.current_device()`` (RoPE frequencies, DDP buffers, optimizer scalars, grad
clipping) or in pinned memory (RoPE under context parallelism), checks
``tensor.type() == 'torch.cuda.FloatTensor'``, and keeps its tensor-parallel RNG streams as
CUDA generator states. On a CPU-only machine this module points all of that at the CPU: a
torch-function mode rewrites CUDA devices to ``cpu``, and the RNG tracker stores CPU
generator states. It is applied only when CUDA is absent; on a
GPU machine nothing here runs.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaAsCpu(TorchFunctionMode):
    """Rewrites every CUDA device argument to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts grads are 'torch.cuda.FloatTensor'; report the CUDA name.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # page-locking needs a CUDA driver (context-parallel RoPE)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def apply_cpu_compat() -> None:
    """Map Megatron-Core's CUDA-isms to the CPU (idempotent; a no-op where CUDA exists)."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add_rng_stream(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mcore_random._get_cuda_rng_state = get_rng_state
    mcore_random._set_cuda_rng_state = set_rng_state
    mcore_random.CudaRNGStatesTracker.add = add_rng_stream
    # The tracker warns whenever the CPU RNG moves inside a fork; with the streams mapped
    # onto the CPU generator that is every fork, so the warning carries no information.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)
    # Entered for the life of the process (thread-local mode stack of the main thread).
    _CudaAsCpu().__enter__()
    _applied = True
