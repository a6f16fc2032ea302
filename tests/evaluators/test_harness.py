"""Zero-shot through lm-eval (evaluators.harness): our files in lm-eval's row layout, lm-eval's own
prompts and targets on them, and its log-likelihoods equal a direct computation on our model object.

Tiny random Llama with a byte-level BPE tokenizer trained in memory (no downloads, seconds); tests on
the real data files read $LLM_PRUNER_DATA and skip without it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from evaluators import harness
from space.errors import UserError
from tests.zeroshot_data import write_tiny_zeroshot_data

REAL_DATA = os.environ.get("LLM_PRUNER_DATA")
needs_data = pytest.mark.skipif(not REAL_DATA, reason="$LLM_PRUNER_DATA is not set")

CORPUS = [
    "Question: what colour is the sky?\nAnswer: blue",
    "The quick brown fox jumps over the lazy dog. Answer: yes or no",
    "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Unbatched, in float64, split as lm-eval's HF model splits (trailing spaces of the context move
    to the continuation; the continuation's tokens come from the joint encoding)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    cont_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context_ids + cont_ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[len(context_ids) + k - 1, token].item() for k, token in enumerate(cont_ids))


# --- small hand-written files (tests/zeroshot_data.py) ------------------------------------


@pytest.fixture
def tiny_zeroshot_data(tmp_path, monkeypatch):
    write_tiny_zeroshot_data(tmp_path)
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def lm_eval_samples(model, tokenizer, task: str, limit: int | None = None) -> tuple[list[dict], dict]:
    """lm-eval's logged samples of ``task`` (by document) and its raw metrics."""
    out, names = harness.run_lm_eval(model, tokenizer, [task], limit=limit, batch_size=4, log_samples=True)
    return sorted(out["samples"][names[task]], key=lambda s: s["doc_id"]), out["results"][names[task]]


def requests(sample: dict) -> list[tuple[str, str]]:
    return [tuple(a) for a in sample["arguments"]]


# --- our rows under lm-eval's task definitions ------------------------------------------------


def test_boolq_string_and_boolean_labels(model, tokenizer, tiny_zeroshot_data):
    samples, _ = lm_eval_samples(model, tokenizer, "boolq")
    assert [int(s["target"]) for s in samples] == [1, 0, 1]
    assert requests(samples[0]) == [("T -- p\nQuestion: is it?\nAnswer:", " no"),
                                    ("T -- p\nQuestion: is it?\nAnswer:", " yes")]


def test_arc_numeric_keys_and_three_or_five_choices(model, tokenizer, tiny_zeroshot_data):
    three, five = lm_eval_samples(model, tokenizer, "arc_easy")[0]
    assert int(three["target"]) == 2 and int(five["target"]) == 4
    assert requests(three)[2] == ("Question: Pick three?\nAnswer:", " three") and len(requests(five)) == 5


def test_piqa_labels_from_their_own_file(model, tokenizer, tiny_zeroshot_data):
    first, second = lm_eval_samples(model, tokenizer, "piqa")[0]
    assert (int(first["target"]), int(second["target"])) == (1, 0)
    assert requests(first) == [("Question: dresser\nAnswer:", " pin "), ("Question: dresser\nAnswer:", " nail")]


def test_openbookqa_answer_key_with_leading_space(model, tokenizer, tiny_zeroshot_data):
    (sample,) = lm_eval_samples(model, tokenizer, "openbookqa")[0]
    assert int(sample["target"]) == 1 and requests(sample)[1] == ("Fog is near", " a marsh")


def test_winogrande_partial_scoring_and_hellaswag_preprocessing(model, tokenizer, tiny_zeroshot_data):
    first, second = lm_eval_samples(model, tokenizer, "winogrande")[0]
    assert requests(first) == [("Sarah beat Maria so Sarah", " won."), ("Sarah beat Maria so Maria", " won.")]
    assert requests(second)[1] == ("Sarah beat Maria so Maria", " lost.")  # gold: lm-eval's doc_to_text of "answer"
    wikihow, activity = lm_eval_samples(model, tokenizer, "hellaswag")[0]
    assert requests(wikihow)[0][0] == "Home and Garden: How to clean.. Get soap."
    assert [c for _, c in requests(wikihow)] == [" Rinse it well.", " Dry it."] and int(wikihow["target"]) == 1
    assert requests(activity)[0][0] == "Clean and jerk: A lady walks. The lady"


def test_log_likelihoods_and_accuracy_equal_a_direct_computation(model, tokenizer, tiny_zeroshot_data):
    for task in ("piqa", "boolq", "arc_easy"):
        samples, metrics = lm_eval_samples(model, tokenizer, task)
        hits = 0
        for sample in samples:
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            ours = [hand_loglikelihood(model, tokenizer, c, x) for c, x in requests(sample)]
            assert theirs == pytest.approx(ours, abs=1e-4), task
            hits += max(range(len(ours)), key=ours.__getitem__) == int(sample["target"])
        assert metrics["acc,none"] == pytest.approx(hits / len(samples)), task


def test_evaluate_zeroshot_reports_headline_metrics_and_their_average(model, tokenizer, tiny_zeroshot_data):
    out = harness.evaluate_zeroshot(model, tokenizer, ["arc_easy", "boolq", "hellaswag"], limit=2)
    assert set(out["zeroshot"]) == {"arc_easy", "boolq", "hellaswag"}
    assert out["zeroshot"]["arc_easy"]["n"] == 2 and out["zeroshot"]["boolq"]["n"] == 2
    assert out["zeroshot_avg_metrics"] == {"arc_easy": "acc", "boolq": "acc", "hellaswag": "acc_norm"}
    headline = [out["zeroshot"][t][out["zeroshot_avg_metrics"][t]] for t in out["zeroshot"]]
    assert out["zeroshot_avg"] == pytest.approx(sum(headline) / 3)
    config = out["zeroshot_config"]
    assert config["backend"] == "lm-eval" and config["dtype"] == "float32" and config["softmax_dtype"] == "float32"
    assert config["local_tasks"] == ["arc_easy", "boolq", "hellaswag"]


def test_task_names():
    assert harness.parse_tasks("all") == list(harness.TASKS)
    assert harness.parse_tasks("PIQA, boolq") == ["piqa", "boolq"]
    with pytest.raises(UserError, match="no zero-shot task"):
        harness.parse_tasks(" , ")
    with pytest.raises(UserError, match="--limit must be a positive"):
        harness.run_lm_eval(None, None, ["piqa"], limit=0)


@pytest.mark.slow
def test_other_task_names_are_checked_against_lm_evals_index():
    with pytest.raises(UserError, match="unknown zero-shot task.*no_such_task"):
        harness.parse_tasks("piqa,no_such_task")  # before any model loads
    assert harness.parse_tasks("piqa,mmlu,gsm8k") == ["piqa", "mmlu", "gsm8k"]


def test_headline_metric_of_other_tasks():
    assert harness.headline_metric("mmlu", {"acc": 0.3}) == "acc"
    assert harness.headline_metric("gsm8k", {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}) \
        == "exact_match,strict-match"
    assert harness.headline_metric("hellaswag", {"acc": 0.3, "acc_norm": 0.4}) == "acc_norm"
    assert harness.headline_metric("boolq", {"acc": 0.3, "acc_norm": 0.4}) == "acc"


def test_a_task_whose_file_is_missing_is_not_local(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tmp_path))
    assert not harness.is_local("piqa")
    write_tiny_zeroshot_data(tmp_path)
    assert harness.is_local("piqa") and not harness.is_local("mmlu")


def test_eval_command_writes_zeroshot_scores(tiny_model_dir, tiny_zeroshot_data, tmp_path, capsys):
    from search.cli import main

    path = tmp_path / "eval.json"
    tasks = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "openbookqa"]  # the tiny files
    assert main(["-q", "eval", str(tiny_model_dir), "--ppl", "none", "--zeroshot", ",".join(tasks),
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert list(result["zeroshot"]) == tasks and result["ppl"] == {}
    headline = [task[task["metric"]] for task in result["zeroshot"].values()]
    assert result["zeroshot_avg"] == pytest.approx(sum(headline) / len(headline))
    assert result["zeroshot"]["boolq"]["n"] == 3 and result["zeroshot"]["boolq"]["metric"] == "acc"
    assert "| average |" in capsys.readouterr().out
    assert main(["-q", "eval", str(tiny_model_dir), "--ppl", "none"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["-q", "eval", str(tiny_model_dir), "--ppl", "none", "--zeroshot", "piqa,no_such_task"]) == 2
    assert "no_such_task" in capsys.readouterr().err


# --- the real files -----------------------------------------------------------------------------

COUNTS = {"piqa": 1838, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267,
          "boolq": 3270, "openbookqa": 500}


@needs_data
def test_real_rows_counts_and_labels():
    for task, count in COUNTS.items():
        rows = harness.local_rows(task)
        assert len(rows) == count, task
        assert harness.local_rows(task, limit=7) == rows[:7], task
    assert sum(r["label"] for r in harness.local_rows("boolq")) == 2033  # "true" strings, MANIFEST.md
    assert sum(r["label"] for r in harness.local_rows("piqa")) == 928
    for task in ("arc_easy", "arc_challenge"):
        assert all(r["answerKey"] in r["choices"]["label"] for r in harness.local_rows(task)), task


@needs_data
@pytest.mark.real
def test_real_model_log_likelihoods_equal_a_direct_computation():
    """SmolLM2-135M in float32 through lm-eval: its per-choice log-likelihoods are the model's."""
    from experiments.eval_exports import load_for_eval

    model, tokenizer, _ = load_for_eval("smollm2-135m", dtype=torch.float32)
    for task in ("arc_challenge", "winogrande"):
        samples, _ = lm_eval_samples(model, tokenizer, task, limit=3)
        for sample in samples:
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            ours = [hand_loglikelihood(model, tokenizer, c, x) for c, x in requests(sample)]
            assert theirs == pytest.approx(ours, abs=2e-3), task
