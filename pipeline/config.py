"""Typed run configuration: YAML recipes in ``configs/`` plus dotted command-line overrides.

A recipe reads like the paper's recipe; ``load_config("configs/tiny.yaml", ["train.lr=3e-4"])``
returns a validated :class:`RunConfig`. Every mistake (unknown key, wrong type, impossible
parallel layout) is a :class:`ConfigError` with one line naming the field and what was
expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field."""


@dataclass
class ModelConfig:
    """A decoder built by Megatron-Core's GPTModel, in one of two families.

    llama: RMSNorm, SwiGLU, RoPE, no biases. gpt2: LayerNorm, GELU, learned absolute
    positions, biases, tied embeddings.
    """

    family: Literal["llama", "gpt2"] = "llama"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = multi-head attention
    ffn_hidden_size: int = 688
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    # "auto": Transformer Engine spec when TE and CUDA are present, else Megatron's local spec.
    layer_spec: Literal["auto", "local", "te"] = "auto"
    # Pad the vocabulary to a multiple of this times TP (Megatron's make-vocab-size-divisible-by).
    vocab_divisible_by: int = 64


@dataclass
class DiffusionConfig:
    """The masked-diffusion adaptation objective (METHOD.md)."""

    # "diffusion" adapts; "ar" is plain next-token training (the AR starting point).
    objective: Literal["diffusion", "ar"] = "diffusion"
    eps: float = 1e-3  # t ~ U[eps, 1)
    stratified_t: bool = False  # stratify t across each global batch (MDLM's low-variance draw)
    shift: bool = True  # logits at i predict token i+1 (DiffuGPT/DiffuLLaMA); False = LLaDA
    # "masked": sum(w * ce) / #masked (paper); "sequence": sum(w * ce) / (B * L) (LLaDA/SMDM)
    normalization: Literal["masked", "sequence"] = "masked"
    anneal_steps: int = 10000  # causal -> bidirectional attention over this many steps; 0 = off
    # "random": each future edge opened with probability r (the paper); "window": a band of
    # the next r * L tokens (sliding-window masks fused kernels run natively).
    anneal_schedule: Literal["random", "window"] = "random"
    # Auxiliary AR loss on the clean batch (Megatron-Bridge's diffusion example mixes
    # 0.3 diffusion + 1.0 AR): loss = diffusion + ar_loss_weight * AR. 0 = off (the paper).
    ar_loss_weight: float = 0.0
    mask_token: str = "<|mask|>"  # a token of the tokenizer, used as the absorbing state
    # Reuse an existing id as the mask instead (GPT-2 small: 10541, LLaMA-2: 811).
    mask_token_id: Optional[int] = None


@dataclass
class DataConfig:
    tokenizer: str = "runs/tiny/tokenizer"  # HF tokenizer name or folder
    # Prepared Megatron datasets (.bin/.idx prefixes) with blend weights.
    prefixes: list[str] = field(default_factory=lambda: ["runs/tiny/data/jargon"])
    weights: Optional[list[float]] = None
    split: str = "95,5,0"  # train, valid, test
    seq_length: int = 128
    cache_dir: str = "runs/tiny/data/cache"
    # For the embedded default: raw corpus files to tokenize when the prefixes do not exist,
    # and the vocabulary size of the BPE tokenizer trained on them when the tokenizer is absent.
    corpus: list[str] = field(default_factory=list)
    tokenizer_vocab_size: int = 4096


@dataclass
class ParallelConfig:
    nproc_per_node: int = 1  # processes launched on each node (GPUs, or CPU ranks)
    nnodes: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    distributed_optimizer: bool = False  # needs reduce-scatter: NCCL, not gloo


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 16
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 4
    save_interval: int = 100
    # Stop (after saving) once this many steps ran in this job; the next job resumes.
    exit_interval: Optional[int] = None
    keep_last: int = 3  # checkpoints kept besides every keep_every-th; 0 keeps all
    keep_every: int = 0
    # A step with a NaN/Inf loss or gradient is skipped (no update). After max_bad_steps in a
    # row, "stop" ends the run; "rollback" reloads the last checkpoint and goes on past the
    # batches that diverged, at most max_rollbacks times in the run.
    max_bad_steps: int = 3
    on_bad_steps: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = 2
    # Write checkpoints in a background process while training goes on (Megatron-Core's
    # async dist_checkpointing).
    async_save: bool = False
    # No progress for this long (a stalled collective or data read) ends the job, and under
    # SLURM requeues it; also the limit on any one torch.distributed collective.
    hang_timeout_minutes: float = 30.0
    # Start from this Megatron checkpoint's weights (fresh optimizer and schedule).
    init_checkpoint: Optional[str] = None


@dataclass
class InitConfig:
    """Where the autoregressive starting point comes from."""

    # "ar_pretrain": no AR checkpoint is available offline, so train one first (the tiny
    # default); "checkpoint": train.init_checkpoint names a Megatron checkpoint; "hf": import
    # hf_model (pipeline.hf_import), whose tokenizer then replaces data.tokenizer.
    source: Literal["ar_pretrain", "checkpoint", "hf"] = "ar_pretrain"
    hf_model: Optional[str] = None  # a Hugging Face GPT-2 or LLaMA model: Hub name or folder
    ar_steps: int = 300
    ar_lr: float = 1e-3


@dataclass
class SampleConfig:
    prompt: str = "The hacker"
    infill_prefix: str = "A hacker is a person who"
    infill_suffix: str = "of programmable systems."
    infill_length: int = 12
    length: int = 48
    steps: int = 48
    temperature: float = 0.9
    top_p: float = 0.9
    # Unmasking order: "random" (DiffuGPT), "confidence" (MaskGIT top-k), "entropy".
    order: Literal["random", "confidence", "entropy"] = "random"
    seed: int = 0
    # Also decode a sample at every evaluation of the adaptation, logged with the metrics.
    during_training: bool = True


@dataclass
class SlurmConfig:
    """How ``pipeline.launch`` submits the run to SLURM. Nodes and tasks per node are
    ``parallel.nnodes`` and ``parallel.nproc_per_node`` (one task per rank)."""

    partition: Optional[str] = None  # None: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 0  # 0: a CPU job (gloo); else one GPU per task (NCCL)
    cpus_per_task: int = 1
    mem_gb: Optional[int] = None  # per node; None: the partition's default
    time_limit_minutes: int = 60
    exclusive: bool = False
    # Requeues after hitting the time limit (preemptions requeue without counting).
    max_requeues: int = 3
    # SLURM warns the job this long before its time limit; the job then requeues itself.
    signal_delay_s: int = 90
    # When known, lets submission refuse a time limit too short to reach one periodic save.
    expected_step_seconds: Optional[float] = None
    # Any other sbatch option, "key=value" or a bare flag ("mail-type=END", "requeue").
    sbatch_options: list[str] = field(default_factory=list)
    # Shell lines run in the job before the tasks start ("module load cuda").
    setup: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str = "tiny"
    output_dir: str = "runs"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def world_size(self) -> int:
        return self.parallel.nproc_per_node * self.parallel.nnodes

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.parallel.tp * self.parallel.pp * self.parallel.cp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the settings that shape the model (what a checkpoint must agree with)."""
        shape = json.dumps(dataclasses.asdict(self.model), sort_keys=True)
        return hashlib.sha256(shape.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Loading, overrides and validation


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a dataclass field annotation, converting what YAML can't say."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _build(cls: type, values: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def validate(cfg: RunConfig) -> None:
    """Checks that need more than one field: the parallel layout and the batch shape."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    for name in ("nproc_per_node", "nnodes", "tp", "pp", "cp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}: expected >= 1, got {getattr(p, name)}")
    model_parallel = p.tp * p.pp * p.cp
    if cfg.world_size % model_parallel:
        raise ConfigError(
            f"parallel: world size {cfg.world_size} (nnodes x nproc_per_node) is not divisible "
            f"by tp*pp*cp = {model_parallel}"
        )
    dp = cfg.data_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size: expected a multiple of micro_batch_size x data-parallel "
            f"size = {t.micro_batch_size} x {dp}, got {t.global_batch_size}"
        )
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"parallel.tp: {p.tp} does not divide model.num_attention_heads={m.num_attention_heads}"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups or groups % p.tp:
        raise ConfigError(
            f"model.num_query_groups: {groups} must divide num_attention_heads "
            f"({m.num_attention_heads}) and be divisible by parallel.tp ({p.tp})"
        )
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size: {m.hidden_size} is not divisible by num_attention_heads "
            f"({m.num_attention_heads})"
        )
    if m.num_layers % p.pp:
        raise ConfigError(f"parallel.pp: {p.pp} does not divide model.num_layers={m.num_layers}")
    if p.cp > 1 and cfg.data.seq_length % (2 * p.cp):
        raise ConfigError(
            f"data.seq_length: {cfg.data.seq_length} must split into 2 x parallel.cp = {2 * p.cp} "
            f"equal chunks (context parallelism's load-balanced split)"
        )
    if cfg.data.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"data.seq_length: {cfg.data.seq_length} exceeds model.max_position_embeddings "
            f"({m.max_position_embeddings})"
        )
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.prefixes):
        raise ConfigError(
            f"data.weights: expected {len(cfg.data.prefixes)} weights (one per prefix), "
            f"got {len(cfg.data.weights)}"
        )
    if cfg.init.source == "hf" and not cfg.init.hf_model:
        raise ConfigError("init.hf_model: init.source=hf needs the HF model to import (Hub name or folder)")
    if t.max_bad_steps < 1 or t.max_rollbacks < 0:
        raise ConfigError(f"train.max_bad_steps / max_rollbacks: expected >= 1 / >= 0, got "
                          f"{t.max_bad_steps} / {t.max_rollbacks}")
    if t.hang_timeout_minutes <= 0:
        raise ConfigError(f"train.hang_timeout_minutes: expected > 0, got {t.hang_timeout_minutes}")
    if not 0.0 < cfg.diffusion.eps < 1.0:
        raise ConfigError(f"diffusion.eps: expected 0 < eps < 1, got {cfg.diffusion.eps}")
    validate_slurm(cfg)


def validate_slurm(cfg: RunConfig) -> None:
    """What the ``slurm`` section must satisfy whatever the cluster (``pipeline.launch`` checks
    the rest against the cluster itself)."""
    s = cfg.slurm
    for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
        if getattr(s, name) < 0:
            raise ConfigError(f"slurm.{name}: expected >= 0, got {getattr(s, name)}")
    for name in ("cpus_per_task", "time_limit_minutes"):
        if getattr(s, name) < 1:
            raise ConfigError(f"slurm.{name}: expected >= 1, got {getattr(s, name)}")
    if s.gpus_per_node and s.gpus_per_node != cfg.parallel.nproc_per_node:
        raise ConfigError(
            f"slurm.gpus_per_node: one task per GPU, so expected parallel.nproc_per_node = "
            f"{cfg.parallel.nproc_per_node}, got {s.gpus_per_node}"
        )
    budget_s = s.time_limit_minutes * 60 - s.signal_delay_s
    if budget_s <= 0:
        raise ConfigError(
            f"slurm.time_limit_minutes: {s.time_limit_minutes} min leaves no time before the "
            f"requeue warning (slurm.signal_delay_s = {s.signal_delay_s})"
        )
    if s.expected_step_seconds is not None:
        save_every_s = cfg.train.save_interval * s.expected_step_seconds
        if save_every_s >= budget_s:
            raise ConfigError(
                f"slurm.time_limit_minutes: {s.time_limit_minutes} min is shorter than one "
                f"checkpoint interval (train.save_interval={cfg.train.save_interval} steps x "
                f"{s.expected_step_seconds} s = {save_every_s:.0f} s, plus the "
                f"{s.signal_delay_s} s warning): a requeued job would never progress"
            )


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML recipe, apply ``section.key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        _apply_override(tree, override)
    cfg = _build(RunConfig, tree)
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
