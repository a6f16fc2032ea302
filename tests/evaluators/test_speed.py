"""Speed and memory benchmark on tiny random Llamas (seconds, no downloads)."""

from __future__ import annotations

import pytest
import torch

from evaluators import speed

SMALL = dict(shapes=((1, 8), (2, 16)), decode_tokens=4, decode_prompt=6, repeats=2, warmup=1)


def tiny_llama(*, intermediate: int = 64, tied: bool = True, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype).eval()


def one_model(model, **options) -> dict:
    """speed.compare of one model: its figures and the run's config."""
    result = speed.compare({"model": model}, **options)
    return {**result["models"]["model"], "config": result["config"]}


def test_benchmark_returns_every_field():
    result = one_model(tiny_llama(), **SMALL)
    for key in ("params", "weight_bytes", "dtype", "device", "torch_threads", "prefill", "prefill_logits",
                "decode", "ttft_s", "peak_increase_bytes", "peak_memory_bytes", "memory_method", "cpu", "config"):
        assert key in result, key
    assert [(p["batch"], p["length"]) for p in result["prefill"]] == [(1, 8), (2, 16)]
    for p in result["prefill"]:
        assert p["tokens_per_s"] == pytest.approx(p["batch"] * p["length"] / p["seconds"])
        assert len(p["all_seconds"]) == 2 and p["seconds"] > 0
    assert result["decode"]["new_tokens"] == 4 and result["decode"]["tokens_per_s"] > 0
    assert result["decode"]["tokens_per_s"] == pytest.approx(3 / result["decode"]["seconds"])
    assert result["ttft_s"] > 0
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["torch_threads"] == torch.get_num_threads()
    assert result["prefill_logits"] == "last position"
    assert result["peak_increase_bytes"] >= 0
    assert result["peak_memory_bytes"] == result["weight_bytes"] + result["peak_increase_bytes"]


def test_params_and_weight_bytes_count_tied_weights_once():
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    by_hand = sum(p.numel() for p in untied.parameters())
    assert speed.model_info(untied)["params"] == by_hand
    assert speed.model_info(tied)["params"] == by_hand - 128 * 32  # one vocab x hidden matrix shared
    assert speed.model_info(untied)["weight_bytes"] == 4 * by_hand
    assert speed.model_info(tiny_llama(tied=False, dtype=torch.bfloat16))["weight_bytes"] == 2 * by_hand
    assert speed.model_info(tiny_llama(dtype=torch.bfloat16))["dtype"] == "bfloat16"


def test_decode_loop_is_greedy_generation_with_the_cache():
    model = tiny_llama()
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    ttft, rest, tokens = speed.time_decode(model, prompt, 5)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0)[:, 6:]
    assert tokens.tolist() == expected.tolist()
    assert ttft > 0 and rest > 0


@pytest.mark.skipif(not speed._reset_rss_peak(),
                    reason="no /proc/self/clear_refs here")
def test_peak_memory_sees_an_allocation_and_not_an_earlier_one():
    with speed.PeakMemory(torch.device("cpu")) as big:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so it is resident
        del block
    with speed.PeakMemory(torch.device("cpu")) as small:  # the 64 MiB freed above must not count
        torch.ones(1024).sum()
    assert big.increase >= 60 * 2**20
    assert small.increase < 16 * 2**20


def test_compare_interleaves_rotates_and_gives_ratios(monkeypatch):
    dense, pruned = tiny_llama(intermediate=64), tiny_llama(intermediate=16)
    calls = []
    real = speed._one_repeat
    monkeypatch.setattr(speed, "_one_repeat", lambda model, **kw: calls.append(model) or real(model, **kw))
    result = speed.compare({"dense": dense, "pruned": pruned}, **{**SMALL, "repeats": 3})
    names = ["dense" if m is dense else "pruned" for m in calls]
    assert names == ["dense", "pruned"] + ["dense", "pruned", "pruned", "dense", "dense", "pruned"]
    assert result["reference"] == "dense" and set(result["models"]) == {"dense", "pruned"}
    ratios = result["ratios"]
    assert ratios["dense"]["params"] == 1.0 and ratios["dense"]["decode_tokens_per_s"] == 1.0
    assert all(r["ratio"] == 1.0 for r in ratios["dense"]["prefill_tokens_per_s"])
    expected = result["models"]["pruned"]["params"] / result["models"]["dense"]["params"]
    assert ratios["pruned"]["params"] == pytest.approx(expected) and expected < 1
    pruned_tps = result["models"]["pruned"]["prefill"][1]["tokens_per_s"]
    dense_tps = result["models"]["dense"]["prefill"][1]["tokens_per_s"]
    assert ratios["pruned"]["prefill_tokens_per_s"][1]["ratio"] == pytest.approx(pruned_tps / dense_tps)
    assert ratios["pruned"]["ttft_speedup"] == pytest.approx(
        result["models"]["dense"]["ttft_s"] / result["models"]["pruned"]["ttft_s"])


def test_bad_options_raise():
    model = tiny_llama()
    with pytest.raises(ValueError):
        one_model(model, shapes=((0, 8),))
    with pytest.raises(ValueError):
        one_model(model, decode_tokens=1)
    with pytest.raises(ValueError):
        speed.compare({})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_on_cuda_uses_the_allocator_peak():
    result = one_model(tiny_llama().cuda(), **SMALL)
    assert result["device"].startswith("cuda")
    assert result["memory_method"] == "torch.cuda.max_memory_allocated"
    assert result["peak_increase_bytes"] > 0


@pytest.mark.real
def test_real_model_benchmark_in_bfloat16():
    from experiments.eval_exports import load_for_eval

    model, _, _ = load_for_eval("smollm2-135m", dtype=torch.bfloat16)
    result = one_model(model, shapes=((1, 64),), decode_tokens=4, repeats=1, warmup=0)
    assert result["dtype"] == "bfloat16"
    assert result["params"] == pytest.approx(134.5e6, rel=0.01)  # PROTOCOL.md, tied embeddings once
    assert result["weight_bytes"] == 2 * result["params"]
    assert result["prefill"][0]["tokens_per_s"] > 0 and result["decode"]["tokens_per_s"] > 0


def test_bench_command_measures_models_side_by_side(tiny_model_dir, tmp_path, capsys):
    import json

    from search.cli import main

    path = tmp_path / "bench.json"
    assert main(["-q", "bench", str(tiny_model_dir), str(tiny_model_dir), "--shapes", "1x8,2x16",
                 "--decode-tokens", "4", "--repeats", "2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    names = list(result["models"])
    assert len(names) == 2 and result["reference"] == names[0]
    assert result["ratios"][names[0]]["params"] == 1.0 and result["ratios"][names[0]]["decode_tokens_per_s"] == 1.0
    assert [p["length"] for p in result["models"][names[1]]["prefill"]] == [8, 16]
    assert "prefill speedup" in capsys.readouterr().out
    assert main(["-q", "bench", str(tiny_model_dir), "--shapes", "1by8"]) == 2
    assert "--shapes" in capsys.readouterr().err
