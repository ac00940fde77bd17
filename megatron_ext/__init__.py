"""Megatron-Core extensions that turn an autoregressive GPT/LLaMA into a masked diffusion LM.

- ``diffusion``: noise (t, masking) and the shifted, 1/t-weighted masked-diffusion loss.
- ``attention``: the causal -> bidirectional attention annealing schedule.
- ``model``: building Megatron-Core's GPTModel for a recipe (local or Transformer Engine spec).
- ``context_parallel``: attention over a sequence split across ranks, under any mask.
- ``sampling``: diffusion decoding (generation and infilling) over any logits function.
- ``cpu_compat``: maps Megatron-Core's CUDA-isms to the CPU when there is no GPU.
"""
