"""The training loop: one process of a (possibly multi-node) Megatron-Core job.

    torchrun --nproc-per-node N -m pipeline.train --config resolved.yaml --out runs/x/adapt

The same loop runs the autoregressive stage (``diffusion.objective=ar``) and the diffusion
adaptation, on CPU with gloo or on GPUs with NCCL, at any TP / PP / DP layout: Megatron-Core
provides the model, the DDP wrapper, the optimizer, the LR schedule, the pipeline schedule
and the checkpoints; ``megatron_ext`` provides the objective and the attention schedule.
The run resumes from the latest checkpoint under ``--out`` when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_ext.attention import (
    anneal_ratio,
    annealed_attention_mask,
    attention_phase,
    causal_attention_mask,
    set_attn_mask_type,
)
from megatron_ext.diffusion import diffusion_loss, diffusion_targets, sample_noise
from megatron_ext.mask_token import resolve_mask_id
from megatron_ext.sampling import diffusion_sample, prompt_and_masks
from megatron_ext.model import build_gpt_model
from pipeline import checkpoint
from pipeline.config import RunConfig, load_config
from pipeline.data import build_datasets, megatron_tokenizer, micro_batches
from pipeline.distributed import init_distributed, is_logging_rank, shutdown_distributed
from pipeline.metrics import MetricsLogger
from pipeline.watchdog import HangWatchdog

# Validation draws its noise from a seed of its own, fixed across evaluations, so the
# validation loss of different steps is measured on the same corruptions.
_VALIDATION_SEED_OFFSET = 99_991


class Objective:
    """Turns a micro-batch into model inputs and its loss, for the AR or diffusion objective."""

    def __init__(self, cfg: RunConfig, mask_id: int, seed: int):
        self.cfg = cfg
        self.mask_id = mask_id
        self.seed = seed

    def forward_step(self, step: int, data_iterator, model):
        batch = next(data_iterator)
        d = self.cfg.diffusion
        length = batch.tokens.shape[1]
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        ar_weight = 0.0
        if d.objective == "ar":
            inputs, labels = batch.tokens, batch.labels
            loss_mask = torch.ones_like(labels, dtype=torch.bool)
            t = torch.ones(labels.shape[0])
            attention_mask = None  # the causal mask type supplies it
        else:
            noised = sample_noise(
                batch.tokens, batch.sample_ids, self.seed, d.eps, self.mask_id,
                stratify_over=self.cfg.train.global_batch_size if d.stratified_t else 0,
            )
            labels, loss_mask = diffusion_targets(batch.tokens, batch.labels, noised.masked, d.shift)
            inputs, t = noised.tokens, noised.t
            attention_mask = annealed_attention_mask(
                step, d.anneal_steps, length, self.seed, d.anneal_schedule
            )
            if _mixes_ar_loss(self.cfg):
                # The clean batch rides along with causal attention, in the same forward pass
                # (so pipeline parallelism sees one micro-batch): per-sample masks.
                ar_weight = d.ar_loss_weight
                if attention_mask is None:  # annealing is over: bidirectional
                    attention_mask = torch.zeros(1, 1, length, length, dtype=torch.bool)
                attention_mask = torch.cat([
                    attention_mask.expand(inputs.shape[0], 1, length, length),
                    causal_attention_mask(length).expand(inputs.shape[0], 1, length, length),
                ])
                inputs = torch.cat([inputs, batch.tokens])
                labels = torch.cat([labels, batch.labels])
            if attention_mask is not None:
                attention_mask = attention_mask.to(device)
        position_ids = torch.arange(length).repeat(inputs.shape[0], 1)
        cp_group = _context_parallel_group()
        if cp_group is not None:
            # This rank's chunks of every sequence, and the mask rows of its queries: noise,
            # targets and the shift were all decided on the whole sequences above.
            local = get_batch_on_this_cp_rank({
                "tokens": inputs, "labels": labels, "loss_mask": loss_mask,
                "position_ids": position_ids, "attention_mask": attention_mask,
            })
            inputs, labels, loss_mask = local["tokens"], local["labels"], local["loss_mask"]
            position_ids, attention_mask = local["position_ids"], local["attention_mask"]
        token_ce = model(
            inputs.to(device), position_ids.to(device), attention_mask, labels=labels.to(device)
        )
        normalization = "masked" if d.objective == "ar" else d.normalization
        return token_ce, partial(self._loss, loss_mask.to(device), t.to(device), normalization,
                                 ar_weight, cp_group)

    @staticmethod
    def _loss(loss_mask, t, normalization, ar_weight, cp_group, token_ce):
        """The micro-batch loss of this rank's share of the sequences (with context
        parallelism the schedule scales it by the CP size and DDP averages over CP ranks);
        the logged values are those of the whole sequences."""
        batch = loss_mask.shape[0]
        loss, counted = diffusion_loss(token_ce[:batch], loss_mask, t, normalization, cp_group)
        logs = {"counted_tokens": counted.detach().float()}
        if ar_weight:
            # The mean next-token cross-entropy of the clean copies.
            ar_loss, _ = diffusion_loss(token_ce[batch:], torch.ones_like(loss_mask), torch.ones_like(t),
                                        "sequence", cp_group)
            logs["ar_loss"] = _sum_over(ar_loss, cp_group)
            loss = loss + ar_weight * ar_loss
        logs["loss"] = _sum_over(loss, cp_group)
        return loss, logs


def _context_parallel_group():
    if parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def _sum_over(value: torch.Tensor, group) -> torch.Tensor:
    """A detached copy of ``value`` summed over ``group`` (a copy: the schedule scales the
    returned loss in place)."""
    value = value.detach().clone()
    if group is not None:
        dist.all_reduce(value, group=group)
    return value


@torch.no_grad()
def training_sample(cfg: RunConfig, model, tokenizer, mask_id: int, step: int):
    """A short diffusion sample from the model being trained, decoded bidirectionally.

    Every rank of the first data-parallel replica decodes in lockstep (the same seed, logits
    gathered over TP); other replicas, and pipeline- or context-parallel layouts (whose ranks
    would have to pass activations or split the sequence per call), return None.
    """
    if (parallel_state.get_pipeline_model_parallel_world_size() > 1
            or parallel_state.get_context_parallel_world_size() > 1
            or parallel_state.get_data_parallel_rank() != 0):
        return None
    s = cfg.sample
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens, fixed = prompt_and_masks([tokenizer.eod] + tokenizer.tokenize(s.prompt), s.length, mask_id)

    def logits_fn(x):
        positions = torch.arange(x.shape[1]).expand_as(x)
        return model(x.to(device), positions.to(device), None, runtime_gather_output=True).cpu()

    model.eval()
    set_attn_mask_type(model, AttnMaskType.no_mask)
    out = diffusion_sample(logits_fn, tokens, fixed, mask_id, tokenizer.vocab_size, steps=s.steps,
                           shift=cfg.diffusion.shift, temperature=s.temperature, top_p=s.top_p,
                           order=s.order, seed=s.seed)
    set_attn_mask_type(model, attention_phase(cfg.diffusion.objective, step, cfg.diffusion.anneal_steps,
                                              _mixes_ar_loss(cfg)))
    model.train()
    return tokenizer.detokenize(out[0, 1:].tolist())


def _mixes_ar_loss(cfg: RunConfig) -> bool:
    return cfg.diffusion.objective == "diffusion" and cfg.diffusion.ar_loss_weight > 0


def build_optimizer(cfg: RunConfig, model):
    t = cfg.train
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            clip_grad=t.grad_clip,
            bf16=t.precision in ("bf16", "fp8"),
            params_dtype=torch.bfloat16 if t.precision in ("bf16", "fp8") else torch.float32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        [model],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style=t.lr_schedule,  # the config's names are Megatron's
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def run_batch(cfg, model, objective, dataset, batch_index, step, forward_only):
    """Global batch ``batch_index`` of ``dataset`` through the pipeline schedule, with the
    attention of training step ``step``; returns the mean loss (on the last stage)."""
    t = cfg.train
    losses = get_forward_backward_func()(
        forward_step_func=partial(objective.forward_step, step),
        data_iterator=micro_batches(dataset, batch_index, t.global_batch_size, t.micro_batch_size),
        model=[model],
        num_microbatches=t.global_batch_size // (t.micro_batch_size * cfg.data_parallel_size),
        seq_length=cfg.data.seq_length,
        # The pipeline's activation shapes: an auxiliary AR loss doubles each micro-batch.
        micro_batch_size=t.micro_batch_size * (2 if _mixes_ar_loss(cfg) else 1),
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    loss = torch.stack([entry["loss"] for entry in losses]).mean()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


def evaluate(cfg, model, objective, dataset, step) -> float | None:
    """Validation loss on the same batches and noise each time, with step ``step``'s attention."""
    model.eval()
    val_objective = Objective(cfg, objective.mask_id, objective.seed + _VALIDATION_SEED_OFFSET)
    with torch.no_grad():
        losses = [
            run_batch(cfg, model, val_objective, dataset, i, step, forward_only=True)
            for i in range(cfg.train.eval_iters)
        ]
    model.train()
    return None if losses[0] is None else sum(losses) / len(losses)


def check_writable(out_dir: Path) -> None:
    """Fail before any work when the stage directory cannot take files."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise OSError(f"--out {out_dir}: cannot write there ({err.strerror})") from None


def train(cfg: RunConfig, out_dir: Path) -> None:
    check_writable(out_dir)
    init_distributed(cfg)
    tokenizer = megatron_tokenizer(cfg.data.tokenizer)
    mask_id = resolve_mask_id(tokenizer, cfg.diffusion.mask_token, cfg.diffusion.mask_token_id)
    model = build_gpt_model(
        cfg.model, cfg.parallel, cfg.train.precision, tokenizer.vocab_size, cfg.data.seq_length
    )
    model = DistributedDataParallel(
        model.config,
        # NaN/Inf gradients are handled by the train.max_bad_steps policy (_step_is_bad).
        DistributedDataParallelConfig(use_distributed_optimizer=cfg.parallel.distributed_optimizer),
        model,
    )
    optimizer, scheduler = build_optimizer(cfg, model)
    # The pipeline schedule calls these: without finalize_model_grads the data-parallel
    # replicas would never all-reduce their gradients.
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    model.config.grad_scale_func = optimizer.scale_loss
    train_set, valid_set = build_datasets(cfg, tokenizer, cfg.train.steps)

    ckpt_root = out_dir / "checkpoints"
    progress = {"step": 0, "data_offset": 0, "rollbacks": 0}
    resume = checkpoint.latest_checkpoint_all_ranks(ckpt_root)
    if resume is not None:
        _check_compatible(cfg, resume, tokenizer.vocab_size)
        progress.update(checkpoint.load_checkpoint(resume, model, optimizer, scheduler))
        _print0(f"resumed from {resume} at step {progress['step']}")
    elif cfg.train.init_checkpoint:
        init = Path(cfg.train.init_checkpoint)
        source = checkpoint.latest_checkpoint_all_ranks(init) or init
        _check_compatible(cfg, source, tokenizer.vocab_size)
        checkpoint.load_checkpoint(source, model)
        _print0(f"initialised weights from {source}")
    checkpoint.check_room_for_first_checkpoint(ckpt_root, model, cfg.train.precision)
    saver = checkpoint.CheckpointSaver(ckpt_root, cfg.train.keep_last, cfg.train.keep_every,
                                       cfg.train.async_save)

    objective = Objective(cfg, mask_id, cfg.train.seed)
    start = progress["step"]
    logger = None
    if is_logging_rank():
        logger = MetricsLogger(out_dir, cfg.train.steps, start, cfg.wandb_mode,
                               f"{cfg.name}-{out_dir.name}", cfg.to_dict())
    manifest = {"config_fingerprint": cfg.fingerprint(), "vocab_size": tokenizer.vocab_size,
                "mask_token_id": mask_id, "objective": cfg.diffusion.objective}
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    train_seconds, steps_timed, interval_losses = 0.0, 0, []
    bad_steps = steps_this_job = 0
    watchdog = HangWatchdog(cfg.train.hang_timeout_minutes * 60, dist.get_rank(), cfg.slurm.max_requeues)
    step = start
    while step < cfg.train.steps:
        watchdog.progress(f"step {step}")
        saver.poll()
        set_attn_mask_type(model, attention_phase(
            cfg.diffusion.objective, step, cfg.diffusion.anneal_steps, _mixes_ar_loss(cfg)
        ))
        values = {}
        if step == start and start == 0:
            # The starting point's validation loss, before any update of this stage.
            values["val_loss_before"] = evaluate(cfg, model, objective, valid_set, step)
        began = time.time()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        # A rollback skips the batches that diverged: the data runs data_offset batches ahead.
        batch_index = step + progress["data_offset"]
        loss = run_batch(cfg, model, objective, train_set, batch_index, step, forward_only=False)
        if _step_is_bad(loss, model):
            bad_steps += 1
            _print0(f"step {step}: NaN/Inf loss or gradient, update skipped ({bad_steps} in a row)")
            values["skipped_update"] = bad_steps
            if bad_steps >= cfg.train.max_bad_steps:
                if cfg.train.on_bad_steps == "rollback" and progress["rollbacks"] < cfg.train.max_rollbacks:
                    watchdog.progress("rollback")
                    saver.wait()
                    step = _roll_back(cfg, ckpt_root, model, optimizer, scheduler, progress,
                                      step, batch_index, logger)
                    bad_steps = 0
                    continue
                raise FloatingPointError(
                    f"train.max_bad_steps: {bad_steps} steps in a row had a NaN/Inf loss or "
                    f"gradient (last: step {step}"
                    + (f", after {progress['rollbacks']} rollbacks" if progress["rollbacks"] else "")
                    + "); resume from a checkpoint before the divergence with a lower train.lr"
                )
            grad_norm = None
        else:
            bad_steps = 0
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            if loss is not None:
                interval_losses.append(loss)
        train_seconds += time.time() - began
        steps_timed += 1
        last = step + 1 == cfg.train.steps
        if (step + 1) % cfg.train.log_interval == 0 or last:
            values.update(
                # Averaged over the log interval, like Megatron-LM's reported loss.
                loss=sum(interval_losses) / len(interval_losses) if interval_losses else None,
                lr=scheduler.get_lr(optimizer.param_groups[0]),
                grad_norm=grad_norm,
                anneal_ratio=1.0 if cfg.diffusion.objective == "ar"
                else anneal_ratio(step, cfg.diffusion.anneal_steps),
                tokens_per_s=steps_timed * tokens_per_step / max(train_seconds, 1e-9),
            )
            train_seconds, steps_timed, interval_losses = 0.0, 0, []
        if (step + 1) % cfg.train.eval_interval == 0 or last:
            watchdog.progress(f"evaluation after step {step}")
            values["val_loss"] = evaluate(cfg, model, objective, valid_set, step)
            if cfg.diffusion.objective == "diffusion" and cfg.sample.during_training:
                values["sample"] = training_sample(cfg, model, tokenizer, mask_id, step)
        if logger is not None and values:
            logger.log(step, values)
        # A job of a longer run (a SLURM allocation) stops after exit_interval steps, saved.
        steps_this_job += 1
        leaving = cfg.train.exit_interval is not None and steps_this_job >= cfg.train.exit_interval
        if (step + 1) % cfg.train.save_interval == 0 or last or leaving:
            watchdog.progress(f"saving step {step + 1}")
            manifest["tokens_seen"] = (step + 1) * tokens_per_step
            progress["step"] = step + 1
            saver.save(step + 1, model, optimizer, scheduler, manifest, progress)
        step += 1
        if leaving:
            _print0(f"exit_interval: stopping after step {step}; run again to resume")
            break
    watchdog.progress("the last save")
    saver.wait()
    watchdog.stop()
    if logger is not None:
        logger.close()
    shutdown_distributed()


def _roll_back(cfg, ckpt_root, model, optimizer, scheduler, progress, step, bad_batch, logger) -> int:
    """Reload the last good checkpoint saved before the run of bad steps that ends at ``step``
    and move the data past ``bad_batch``; returns the step to go on from. ``progress`` (saved
    with every checkpoint) keeps the new data position."""
    first_bad = step - cfg.train.max_bad_steps + 1
    good = checkpoint.latest_checkpoint_all_ranks(ckpt_root, at_most_step=first_bad)
    if good is None:
        raise FloatingPointError(
            f"train.on_bad_steps=rollback: {cfg.train.max_bad_steps} bad steps in a row from "
            f"step {first_bad} and no checkpoint under {ckpt_root} from before them"
        )
    restored = checkpoint.load_checkpoint(good, model, optimizer, scheduler)["step"]
    progress["data_offset"] = bad_batch + 1 - restored
    progress["rollbacks"] += 1
    _print0(f"rolled back to {good.name} (rollback {progress['rollbacks']} of at most "
            f"{cfg.train.max_rollbacks}); data skips ahead to batch {bad_batch + 1}")
    if logger is not None:
        logger.log(restored, {"rollback_to": restored, "data_offset": progress["data_offset"]})
    return restored


def _step_is_bad(loss: float | None, model) -> bool:
    """Whether any rank saw a NaN/Inf loss (only the last pipeline stage holds it) or a NaN/Inf
    gradient, checked before the optimizer would spread it into the weights."""
    bad = loss is not None and not math.isfinite(loss)
    for param in model.parameters():
        grad = getattr(param, "main_grad", param.grad)
        if bad or grad is None:
            continue
        bad = not bool(torch.isfinite(grad).all())
    flag = torch.tensor([float(bad)])
    if torch.cuda.is_available():
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _check_compatible(cfg: RunConfig, path: Path, vocab_size: int) -> None:
    """A checkpoint of another model shape or tokenizer is a clear error, not a wall of
    missing keys or silently misread embeddings."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        return
    manifest = json.loads(manifest_path.read_text())
    saved = manifest.get("config_fingerprint")
    if saved is not None and saved != cfg.fingerprint():
        raise ValueError(
            f"{path}: saved from a different model shape (fingerprint {saved}, this config's "
            f"model section gives {cfg.fingerprint()})"
        )
    if manifest.get("vocab_size", vocab_size) != vocab_size:
        raise ValueError(
            f"{path}: saved with a tokenizer of {manifest['vocab_size']} tokens, but "
            f"data.tokenizer ({cfg.data.tokenizer}) has {vocab_size}"
        )


def _print0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="stage directory (checkpoints, metrics)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides), Path(args.out))


if __name__ == "__main__":
    main()
