"""Zero-shot evaluation: scorer, prompts and label mapping, loaders on the real files.

The scorer runs on a tiny random Llama with a byte-level BPE tokenizer trained in memory (no
downloads, seconds). Tests on the real data files read $LLM_PRUNER_DATA and skip without it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from evaluators import zeroshot
from evaluators.zeroshot import Example, encode_pair, load_task, loglikelihoods, predictions, score_task
from space.errors import UserError

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


REQUESTS = [
    ("Question: what colour is the sky?\nAnswer:", " blue"),
    ("Question: what colour is the sky?\nAnswer:", " yes"),  # same input as the next one
    ("Question: what colour is the sky?\nAnswer:", " no"),
    ("Answer: ", "yes"),  # trailing space moves to the continuation
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
]


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Unbatched, token by token, in float64: what the scorer must reproduce."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    cont_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    ids = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for k, token in enumerate(cont_ids):
        position = len(context_ids) + k - 1  # the logits that predict this token
        total += (logits[position, token] - torch.logsumexp(logits[position], dim=0)).item()
    return total


# --- tokenisation and log-likelihood --------------------------------------------------------


def test_encode_pair_moves_trailing_space_and_splits_joint_encoding(tokenizer):
    context_ids, cont_ids = encode_pair(tokenizer, "Answer: ", "yes")
    assert context_ids == tokenizer.encode("Answer:")
    assert context_ids + cont_ids == tokenizer.encode("Answer: yes")
    assert tokenizer.decode(cont_ids) == " yes"


def test_encode_pair_keeps_the_context_encoding_when_the_joint_one_merges(tokenizer):
    # "Answe" + "r: blue": encoded together, "Answer" is one piece; lm-eval keeps the context's
    # own ids and takes the continuation from the joint encoding after that many tokens.
    context_ids, cont_ids = encode_pair(tokenizer, "Answe", "r: blue")
    whole = tokenizer.encode("Answer: blue")
    assert context_ids == tokenizer.encode("Answe")
    assert cont_ids == whole[len(context_ids):]


def test_loglikelihoods_match_hand_computation(model, tokenizer):
    expected = [hand_loglikelihood(model, tokenizer, c, x) for c, x in REQUESTS]
    got = loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, progress=False)
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(v < 0 for v in got)
    assert got[1] != got[2]  # shared forward pass, different answer tokens


def test_loglikelihoods_do_not_depend_on_batching(model, tokenizer):
    one = loglikelihoods(model, tokenizer, REQUESTS, batch_size=1, progress=False)
    many = loglikelihoods(model, tokenizer, REQUESTS, batch_size=16, progress=False)
    assert many == pytest.approx(one, abs=1e-4)


def test_loglikelihoods_truncate_from_the_left(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    short = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=8)).eval()
    context = "The quick brown fox jumps over the lazy dog. Answer: yes or no"
    (value,) = loglikelihoods(short, tokenizer, [(context, " blue")], progress=False)
    context_ids, cont_ids = encode_pair(tokenizer, context, " blue")
    ids = torch.tensor([(context_ids + cont_ids)[-9:][:-1]])
    with torch.no_grad():
        logprobs = short(input_ids=ids).logits[0].double().log_softmax(-1)
    expected = sum(logprobs[8 - len(cont_ids) + k, t].item() for k, t in enumerate(cont_ids))
    assert value == pytest.approx(expected, abs=1e-4)


def test_loglikelihoods_agree_with_lm_eval_hf_model(model, tokenizer):
    """The same requests through lm-eval's own HFLM: same tokens, same numbers."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu", softmax_dtype="float32")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)]
    theirs = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    ours = loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, progress=False)
    assert ours == pytest.approx(theirs, abs=1e-4)


# --- metrics --------------------------------------------------------------------------------


def test_acc_norm_divides_by_characters_of_the_choice():
    example = Example(contexts=("q",) * 2, continuations=(" ab", " abcdefgh"), choices=("ab", "abcdefgh"), gold=1)
    assert predictions(example, [-10.0, -12.0]) == {"acc": 0, "acc_norm": 1}  # -5 vs -1.5 per char


def test_score_task_reports_lm_eval_metrics_and_headline():
    examples = [Example(("q",) * 2, (" a", " bb"), ("a", "bb"), gold) for gold in (0, 1, 1, 0)]
    lls = [[-1.0, -3.0], [-1.0, -1.5], [-5.0, -1.0], [-2.0, -1.0]]
    result = score_task("piqa", examples, lls)
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.75
    assert result["metric"] == "acc" and result["n"] == 4
    assert result["stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    assert "acc_norm" not in score_task("boolq", examples, lls)


def test_evaluate_zeroshot_on_tiny_model(model, tokenizer, tmp_path, monkeypatch):
    write_tiny_data(tmp_path)
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tmp_path))
    out = zeroshot.evaluate_zeroshot(model, tokenizer, ["arc_easy", "boolq", "winogrande"], progress=False)
    assert set(out["zeroshot"]) == {"arc_easy", "boolq", "winogrande"}
    assert out["zeroshot"]["arc_easy"]["n"] == 2 and out["zeroshot"]["boolq"]["n"] == 3
    headline = [out["zeroshot"][t][out["zeroshot_avg_metrics"][t]] for t in out["zeroshot"]]
    assert out["zeroshot_avg"] == pytest.approx(sum(headline) / 3)
    assert out["zeroshot_avg_metrics"] == {"arc_easy": "acc", "boolq": "acc", "winogrande": "acc"}
    assert out["zeroshot_config"]["dtype"] == "float32"


# --- loaders on small hand-written files: label mapping edge cases ---------------------------


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_tiny_data(root: Path) -> None:
    choice = lambda label, text: {"label": label, "text": text}  # noqa: E731
    _jsonl(root / "arc/ARC-Easy-Test.jsonl", [
        {"id": "num3", "question": {"stem": "Pick three?", "choices": [choice("1", "one"), choice("2", "two"),
                                                                       choice("3", "three")]}, "answerKey": "3"},
        {"id": "let5", "question": {"stem": "Pick E?", "choices": [choice(k, k.lower()) for k in "ABCDE"]},
         "answerKey": "E"},
    ])
    _jsonl(root / "boolq/val.jsonl", [
        {"question": "is it", "passage": "T -- p", "idx": 0, "label": "true"},
        {"question": "is it", "passage": "T -- p", "idx": 1, "label": "false"},
        {"question": "is it", "passage": "T -- p", "idx": 2, "label": True},
    ])
    _jsonl(root / "winogrande/winogrande_xl_validation.jsonl", [
        {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "Sarah beat Maria so _ lost.", "option1": "Sarah", "option2": "Maria", "answer": "2"},
    ])
    _jsonl(root / "openbookqa/test.jsonl", [
        {"id": "1", "question_stem": "Fog is near", "answerKey": " B",
         "choices": {"text": ["a desert", "a marsh", "plains", "space"], "label": ["A", "B", "C", "D"]}},
    ])
    _jsonl(root / "hellaswag/hellaswag_val.jsonl", [
        {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean. [title] Get soap.", "ctx_b": "",
         "endings": ["Rinse  it [step] well.", "Dry it."], "label": "1"},
        {"activity_label": "Clean and jerk", "ctx_a": "A lady walks.", "ctx_b": "THE lady", "endings": ["a", "b"],
         "label": "0"},
    ])
    _jsonl(root / "piqa/valid.jsonl", [{"goal": "dresser", "sol1": "pin ", "sol2": "nail"}])
    (root / "piqa/valid-labels.lst").write_text("1\n")


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    write_tiny_data(tmp_path)
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tmp_path))
    return tmp_path


def test_arc_numeric_keys_and_three_or_five_choices(tiny_data):
    three, five = load_task("arc_easy")
    assert three.choices == ("one", "two", "three") and three.gold == 2
    assert three.contexts[0] == "Question: Pick three?\nAnswer:" and three.continuations[2] == " three"
    assert len(five.choices) == 5 and five.gold == 4


def test_boolq_string_and_boolean_labels(tiny_data):
    examples = load_task("boolq")
    assert [e.gold for e in examples] == [1, 0, 1]
    assert examples[0].choices == ("no", "yes")
    assert examples[0].contexts[0] == "T -- p\nQuestion: is it?\nAnswer:"


def test_boolq_bad_label_is_a_user_error(tiny_data):
    _jsonl(tiny_data / "boolq/val.jsonl", [{"question": "q", "passage": "p", "label": "maybe"}])
    with pytest.raises(UserError, match="boolq/val.jsonl, example 1"):
        load_task("boolq")


def test_winogrande_partial_scoring(tiny_data):
    first, second = load_task("winogrande")
    assert first.contexts == ("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria")
    assert first.continuations == (" won.", " won.") and first.gold == 0 and second.gold == 1


def test_openbookqa_answer_key_with_leading_space(tiny_data):
    (example,) = load_task("openbookqa")
    assert example.gold == 1 and example.contexts[0] == "Fog is near"


def test_hellaswag_preprocessing(tiny_data):
    wikihow, activity = load_task("hellaswag")
    assert wikihow.contexts[0] == "Home and Garden: How to clean.. Get soap."
    assert wikihow.choices == ("Rinse it well.", "Dry it.") and wikihow.gold == 1
    assert activity.contexts[0] == "Clean and jerk: A lady walks. The lady"


def test_piqa_keeps_trailing_spaces_of_solutions(tiny_data):
    (example,) = load_task("piqa")
    assert example.continuations == (" pin ", " nail") and example.gold == 1


def test_unknown_task_and_missing_file_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown zero-shot task"):
        load_task("mmlu")
    with pytest.raises(UserError, match="unknown zero-shot task"):
        zeroshot.parse_tasks("piqa,nope")
    monkeypatch.setenv("LLM_PRUNER_DATA", str(tmp_path))
    with pytest.raises(UserError, match="not found: .*piqa/valid.jsonl"):
        load_task("piqa")
    monkeypatch.delenv("LLM_PRUNER_DATA")
    with pytest.raises(UserError, match="LLM_PRUNER_DATA is not set"):
        load_task("boolq")


# --- the real files ------------------------------------------------------------------------

COUNTS = {"piqa": 1838, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267,
          "boolq": 3270, "openbookqa": 500}


@needs_data
@pytest.mark.parametrize("task", sorted(COUNTS))
def test_real_loader_counts(task):
    examples = load_task(task)
    assert len(examples) == COUNTS[task]
    assert all(0 <= e.gold < len(e.choices) == len(e.contexts) == len(e.continuations) for e in examples)
    assert all(x.startswith(" ") and c for e in examples for c, x in e.requests())
    assert len(load_task(task, limit=7)) == 7 and load_task(task, limit=7) == examples[:7]


@needs_data
def test_real_label_distributions():
    boolq = load_task("boolq")
    assert sum(e.gold for e in boolq) == 2033  # "true" strings, MANIFEST.md
    assert sum(e.gold for e in load_task("piqa")) == 928
    assert [sum(e.gold == k for e in load_task("hellaswag")) for k in range(4)] == [2515, 2485, 2584, 2458]


@needs_data
def test_real_arc_numeric_keys_and_choice_counts():
    root = Path(REAL_DATA) / "arc"
    for name, numeric in (("ARC-Easy-Test.jsonl", 97), ("ARC-Challenge-Test.jsonl", 22)):
        rows = [json.loads(line) for line in (root / name).read_text().splitlines()]
        task = "arc_easy" if "Easy" in name else "arc_challenge"
        examples = load_task(task)
        assert sum(r["answerKey"].isdigit() for r in rows) == numeric
        sizes = {len(e.choices) for e in examples}
        assert {3, 4, 5} <= sizes if task == "arc_easy" else {3, 4} <= sizes
        for row, example in zip(rows, examples):
            labels = [c["label"] for c in row["question"]["choices"]]
            assert example.gold == labels.index(row["answerKey"])
            assert example.choices[example.gold] == row["question"]["choices"][example.gold]["text"]


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("limit", [100, None])
def test_real_requests_equal_lm_eval_requests(limit):
    """Every request, choice list (acc_norm's lengths) and gold index equals lm-eval's own
    (the first 100 documents of each task, then all ~20k: seconds, then a minute or two)."""
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import tempfile

    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    from experiments.crosscheck_lm_eval import write_task_configs

    with tempfile.TemporaryDirectory() as tmp:
        names = write_task_configs(Path(tmp), list(COUNTS))
        for task, name in names.items():
            lm_task = ConfigurableTask(config=load_yaml(Path(tmp) / f"{name}.yaml"))
            lm_task.build_all_requests(limit=limit, rank=0, world_size=1)
            theirs = {}
            for instance in lm_task.instances:
                theirs.setdefault(instance.doc_id, []).append(instance.arguments)
            ours = load_task(task, limit=limit)
            assert len(theirs) == len(ours), task
            for doc_id, (example, doc) in enumerate(zip(ours, lm_task.eval_docs)):
                assert example.requests() == theirs[doc_id], (task, doc_id)
                assert list(example.choices) == lm_task.doc_to_choice(doc), (task, doc_id)
                gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
                assert example.gold == gold, (task, doc_id)


@needs_data
@pytest.mark.real
def test_real_model_loglikelihoods_agree_with_lm_eval():
    """SmolLM2-135M in float32: our scorer and lm-eval's HFLM on the same requests."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from experiments.eval_exports import load_for_eval

    model, tokenizer, _ = load_for_eval("smollm2-135m", dtype=torch.float32)
    requests = [r for task in ("arc_challenge", "winogrande", "hellaswag") for e in load_task(task, limit=4)
                for r in e.requests()]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    theirs = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    ours = loglikelihoods(model, tokenizer, requests, batch_size=8, progress=False)
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_eval_command_writes_zeroshot_scores(tiny_model_dir, tiny_data, tmp_path, capsys):
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
