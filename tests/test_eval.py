"""Likelihood scoring, the lm-eval adapter and the run report, on a tiny model that has learnt
a synthetic task: every document is one word repeated, so the right continuation of
"w3 w3 w3" is "w3 w3" and diffusion decoding should write w3 into every mask."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.masking_utils import create_bidirectional_mask

from megatron_ext.diffusion import diffusion_loss, diffusion_targets, sample_noise
from megatron_ext.scoring import diffusion_log_likelihood
from pipeline.evaluate import PAPER_TASKS, SMOKE_TASKS, markdown_table, run_harness, write_smoke_tasks, write_task
from pipeline.hf_model import diffusion_logits, load_diffusion_lm

WORDS = [f"w{i}" for i in range(12)]
EOS, MASK = 0, 1  # ids of <|endoftext|> and <|mask|>


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread (and the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def repeated_words(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    words = torch.randint(2, 2 + len(WORDS), (batch, 1), generator=generator)
    return torch.cat([torch.full((batch, 1), EOS), words.repeat(1, length - 1)], dim=1)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A 1-layer LLaMA trained for a few seconds with the shifted diffusion loss, saved like an export."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=EOS, eos_token_id=EOS,
                         pad_token_id=EOS, mask_token_id=MASK, diffusion_shift=True)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(150):
        x0 = repeated_words(32, 10, generator)
        noised = sample_noise(x0, torch.arange(32) + 32 * step, seed=0, eps=1e-3, mask_id=MASK)
        embeds = model.get_input_embeddings()(noised.tokens)
        full = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                         allow_is_bidirectional_skip=False)
        logits = model(inputs_embeds=embeds, attention_mask=full).logits
        next_tokens = torch.cat([x0[:, 1:], x0[:, -1:]], dim=1)
        labels, loss_mask = diffusion_targets(x0, next_tokens, noised.masked, shift=True)
        token_ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        loss, _ = diffusion_loss(token_ce, loss_mask, noised.t, "masked")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vocab = {"<|endoftext|>": EOS, "<|mask|>": MASK, **{w: 2 + i for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        mask_token="<|mask|>", pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("repeat") / "export"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_scoring_prefers_the_learnt_continuation(export_dir):
    model, _ = load_diffusion_lm(export_dir)

    def score(context, continuation, seed=0):
        return diffusion_log_likelihood(lambda x: diffusion_logits(model, x), context, continuation, MASK,
                                        model.config.vocab_size, noise_levels=32, seed=seed)

    for word in (2, 7, 13):
        right = score([EOS, word, word, word], [word, word])
        for other in (3, 9):
            assert right > score([EOS, word, word, word], [other, other]) + 1.0
    assert score([EOS, 4, 4], [4, 5, 4]) == score([EOS, 4, 4], [4, 5, 4])  # seeded
    assert score([EOS, 4, 4], [4, 5, 4], seed=1) != score([EOS, 4, 4], [4, 5, 4], seed=2)


def test_scoring_needs_a_context_with_the_shift():
    with pytest.raises(ValueError, match="give a context"):
        diffusion_log_likelihood(lambda x: torch.zeros(*x.shape, 8), [], [3], MASK, 8)


def test_harness_runs_local_tasks_end_to_end(export_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import pipeline.lm_eval_model  # noqa: F401  (registers "difftron")

    rows = [{"context": " ".join([w] * 3), "choices": [" ".join([c] * 2) for c in WORDS[:4]],
             "label": i, "target": " ".join([w] * 3)} for i, w in enumerate(WORDS[:4])]
    write_task(tmp_path, {"task": "repeat_choice", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                          "doc_to_choice": "choices", "doc_to_target": "label",
                          "metric_list": [{"metric": "acc"}]}, rows)
    write_task(tmp_path, {"task": "repeat_word", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
                          "doc_to_target": "{{' ' + context.split(' ')[0]}}", "metric_list": [{"metric": "acc"}]}, rows)
    write_task(tmp_path, {"task": "repeat_generate", "output_type": "generate_until", "doc_to_text": "{{context}}",
                          "doc_to_target": "{{target}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3},
                          "metric_list": [{"metric": "exact_match"}]}, rows)
    results = lm_eval.simple_evaluate(
        model="difftron", model_args={"pretrained": str(export_dir), "noise_levels": 16, "batch_size": 3},
        tasks=["repeat_choice", "repeat_word", "repeat_generate"], bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )["results"]
    assert results["repeat_choice"]["acc,none"] == 1.0  # scored by the diffusion loss
    assert results["repeat_word"]["acc,none"] == 1.0  # the next word is decoded greedily
    assert results["repeat_generate"]["exact_match,none"] == 1.0  # batched diffusion sampling


def test_offline_smoke_tasks_run_through_the_harness(export_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    write_smoke_tasks(tmp_path, examples=2)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    harness = run_harness(export_dir, list(SMOKE_TASKS), manager, limit=2, model_args={"noise_levels": 4})
    assert harness["n-samples"]["smoke_choice"]["effective"] == 2
    assert set(harness["results"]) == set(SMOKE_TASKS)


def test_markdown_table_sits_beside_the_paper():
    results = {task: {"acc,none": 0.5} for task in PAPER_TASKS}
    table = markdown_table(results, "mine").splitlines()
    assert table[0] == "| model | HSwag | Wino | SIQA | PIQA | Lambada |"
    assert table[2] == "| mine | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |"
    assert table[-1] == "| DiffuLLaMA (paper) | 58.7 | 56.4 | 43.2 | 63.3 | 53.9 |"
    assert len(markdown_table({"smoke_choice": {"acc,none": 0.25}}, "mine").splitlines()) == 3  # no paper rows


def test_report_draws_the_curves_and_gathers_eval_and_samples(tmp_path):
    from pipeline.report import write_report

    for stage in ("ar", "adapt"):
        (tmp_path / stage).mkdir()
        rows = [{"step": 0, "val_loss_before": 9.0}]
        rows += [{"step": s, "loss": 8.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0, "anneal_ratio": min(1.0, s / 20),
                  "tokens_per_s": 1000.0} for s in range(0, 40, 10)]
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.md").write_text("| model | smoke_choice |\n|---|---|\n| x | 50.0 |\n")
    (tmp_path / "samples.txt").write_text("--- sample\nthe hacker\n")
    report = write_report(tmp_path).read_text()
    for name in ("loss", "lr", "anneal_ratio", "tokens_per_s"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000
        assert f"report/{name}.png" in report
    assert "| x | 50.0 |" in report and "the hacker" in report
