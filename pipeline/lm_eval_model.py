"""lm-evaluation-harness adapter: harness tasks run on an exported diffusion LM.

    lm_eval --include_path ... --model difftron --model_args pretrained=runs/tiny/export
    (import pipeline.lm_eval_model first, or use ``python -m pipeline.evaluate``)

- ``loglikelihood``: the negative diffusion loss of the continuation given the context
  (``megatron_ext.scoring``), averaged over ``noise_levels`` stratified noise levels. Its
  ``is_greedy`` answers "does diffusion decoding generate this continuation?": the
  continuation's tokens are masked and decoded greedily, one per step, most confident first.
  That is how the paper scores LAMBADA (by generating the last word), and it is what the
  harness's ``acc`` for lambada-style tasks reads. It costs a model call per token, so it is
  decoded only for continuations of at most ``greedy_max_tokens`` (a last word); longer ones,
  the answers of multiple-choice tasks, which read only the score, report False.
- ``generate_until``: diffusion sampling of ``max_gen_toks`` tokens after the context (a
  diffusion LM decodes a fixed-length span), cut at the first stop string; requests are decoded
  in left-padded batches.
- ``loglikelihood_rolling`` (perplexity tasks) is not provided.

Every sequence starts with the EOS token, as documents do in training; contexts longer than
the model's window lose their oldest tokens.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron_ext.sampling import diffusion_sample, prompts_and_masks
from megatron_ext.scoring import diffusion_log_likelihood
from pipeline.hf_model import diffusion_logits, load_diffusion_lm


@register_model("difftron")
class DiffusionLM(LM):
    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        batch_size: int | str = 8,
        noise_levels: int = 32,
        seed: int = 0,
        order: str = "confidence",
        steps: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_gen_toks: int = 32,
        greedy_max_tokens: int = 8,
    ) -> None:
        """``steps`` None decodes one token per step; temperature 0 decodes greedily."""
        super().__init__()
        self.model, self.tokenizer = load_diffusion_lm(str(pretrained), device)
        config = self.model.config
        self.mask_id = config.mask_token_id
        self.shift = bool(getattr(config, "diffusion_shift", True))
        self.window = config.max_position_embeddings
        self.vocab_size = len(self.tokenizer)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not searched
        self.noise_levels = int(noise_levels)
        self.seed = int(seed)
        self.order, self.steps = order, steps
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.max_gen_toks = int(max_gen_toks)
        self.greedy_max_tokens = int(greedy_max_tokens)
        self._device = torch.device(device)

    def _logits(self, tokens: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor:
        if attention is not None:
            attention = attention.to(self._device)
        return diffusion_logits(self.model, tokens.to(self._device), attention)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of both, split where the joint encoding splits (as the harness's HF model)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # a trailing space belongs to the next word's token
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self._encode(context)
        whole = self._encode(context + continuation)
        return [self.tokenizer.eos_token_id] + context_ids, whole[len(context_ids) :]

    def _fit_window(self, context: list[int], room: int) -> list[int]:
        """The context's newest tokens that leave ``room`` positions in the window."""
        keep = self.window - room
        if keep < 1:
            raise ValueError(f"{room} tokens to score or generate do not fit a {self.window}-token window")
        return context[-keep:]

    def _decodes_greedily(self, context: list[int], continuation: list[int]) -> bool:
        eos = self.tokenizer.eos_token_id
        tokens, fixed, _ = prompts_and_masks([context], len(continuation), self.mask_id, pad_id=eos)
        decoded = diffusion_sample(
            self._logits, tokens, fixed, self.mask_id, self.vocab_size, steps=len(continuation),
            shift=self.shift, temperature=0.0, order="confidence",
        )
        return decoded[0, len(context) :].tolist() == continuation

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="diffusion scoring"):
            context, continuation = self._encode_pair(*request.args)
            context = self._fit_window(context, len(continuation))
            score = diffusion_log_likelihood(
                self._logits, context, continuation, self.mask_id, self.vocab_size,
                shift=self.shift, noise_levels=self.noise_levels, seed=self.seed,
            )
            greedy = len(continuation) <= self.greedy_max_tokens and self._decodes_greedily(context, continuation)
            results.append((score, greedy))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise NotImplementedError("difftron: perplexity (rolling loglikelihood) tasks are not supported")

    def generate_until(self, requests) -> list[str]:
        results: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="diffusion decoding"):
            batch = requests[start : start + self.batch_size]
            # Requests of one task share gen_kwargs; a batch decodes one length with one set.
            groups: dict[int, list[int]] = {}
            for index, request in enumerate(batch):
                length = int(request.args[1].get("max_gen_toks", self.max_gen_toks))
                groups.setdefault(min(length, self.window - 1), []).append(index)
            texts = [""] * len(batch)
            for length, indices in groups.items():
                for index, text in zip(indices, self._generate([batch[i] for i in indices], length)):
                    texts[index] = text
            results.extend(texts)
        return results

    def _generate(self, requests, length: int) -> list[str]:
        eos = self.tokenizer.eos_token_id
        prompts = [self._fit_window([eos] + self._encode(request.args[0]), length) for request in requests]
        tokens, fixed, attention = prompts_and_masks(prompts, length, self.mask_id, pad_id=eos)
        decoded = diffusion_sample(
            lambda x: self._logits(x, attention), tokens, fixed, self.mask_id, self.vocab_size,
            steps=self.steps or length, shift=self.shift, temperature=self.temperature,
            top_p=self.top_p, order=self.order, seed=self.seed,
        )
        texts = []
        for row, request in zip(decoded, requests):
            generated = row[-length:].tolist()
            if eos in generated:  # the end of a document ends the generation
                generated = generated[: generated.index(eos)]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            until = request.args[1].get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop)[0] if stop else text
            texts.append(text)
        return texts
