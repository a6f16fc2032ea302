import json
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM

from search.cli import main

PRUNE = ["prune", "--nsamples", "4", "--calib-seqlen", "16", "--batch-size", "2"]


def run(argv, capsys):
    """Exit status and output of the command; argparse's own errors exit through SystemExit."""
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def test_prune_exports_a_model_that_reloads(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, io = run([*PRUNE, "--model", str(tiny_model_dir), "--ratio", "0.6", "--importance", "obs",
                    "--allocation", "global", "--out", str(out), "--eval", "wikitext2", "--eval-seqlen", "32"], capsys)
    assert code == 0, io.err
    record = json.loads((out / "subnet.json").read_text())
    assert abs(record["block_ratio"] - 0.6) <= 0.003
    assert record["recipe"]["importance"] == "obs" and record["recipe"]["allocation"] == "global"
    assert record["recipe"]["calibration"]["split"] == "validation"
    assert record["metrics"]["ppl"]["wikitext2"] > 1
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == record["subnet"]["total_params"]
    assert (out / "importance.pt").is_file()


def test_prune_config_file_sets_the_options_and_flags_override_it(tiny_model_dir, tiny_data, tmp_path, capsys):
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "ratio": 0.6, "importance": "wanda-sp",
                                      "allocation": "uniform", "nsamples": 4, "calib-seqlen": 16, "batch_size": 2,
                                      "eval_ppl": ["wikitext2"], "eval_seqlen": 32}))
    code, io = run(["prune", "--config", str(config), "--ratio", "0.8", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, io.err
    record = json.loads((tmp_path / "out" / "subnet.json").read_text())
    assert abs(record["block_ratio"] - 0.8) <= 0.003  # the flag, not the file's 0.6
    assert record["recipe"]["importance"] == "wanda-sp" and record["recipe"]["allocation"] == "uniform"
    assert record["recipe"]["calibration"]["nsamples"] == 4 and "wikitext2" in record["metrics"]["ppl"]
    for bad, message in (({"ratio": 1.5}, "ratio must be in (0, 1]"), ({"colour": "red"}, "unknown option(s) colour"),
                         ({"dtype": "int4"}, "dtype must be one of"), ({"out": "elsewhere"}, "unknown option(s) out")):
        config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "ratio": 0.6, **bad}))
        code, io = run(["prune", "--config", str(config), "--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and message in io.err and "Traceback" not in io.err, io.err
    assert not (tmp_path / "bad").exists()


def test_eval_writes_the_promised_json(tiny_model_dir, tiny_data, tmp_path, capsys):
    path = tmp_path / "eval.json"
    code, io = run(["eval", str(tiny_model_dir), "--ppl", "wikitext2", "--seqlen", "32", "--limit-windows", "3",
                    "--json", str(path)], capsys)
    assert code == 0, io.err
    result = json.loads(path.read_text())
    assert set(result) >= {"ppl", "seqlen", "windows", "dtype", "params", "model", "environment", "seconds"}
    assert result["windows"] == {"wikitext2": 3} and result["seqlen"] == 32
    assert result["params"]["block"] < result["params"]["total"]
    assert "| wikitext2 | 3 |" in io.out


BAD = [
    (["--model", "/nonexistent/model", "--ratio", "0.5"], "model not found"),
    (["--ratio", "0"], "ratio must be in (0, 1]"),
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--ratio", "0.5", "--importance", "entropy"], "unknown importance score"),
    (["--ratio", "0.5", "--allocation", "zigzag"], "unknown allocation"),
    (["--ratio", "0.5", "--calib", "imagenet"], "unknown dataset"),
    (["--ratio", "0.5", "--calib", "ptb"], "not found locally"),  # the tiny data folder has no PTB
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_prune_input_is_one_message_and_exit_2(tiny_model_dir, tiny_data, tmp_path, capsys, extra, message):
    argv = [*PRUNE, *(["--model", str(tiny_model_dir)] if "--model" not in extra else []), *extra,
            "--out", str(tmp_path / "out")]
    code, io = run(argv, capsys)
    assert code == 2
    assert message in io.err and "Traceback" not in io.err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_not_ours_is_refused_untouched(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "important"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    code, io = run([*PRUNE, "--model", str(tiny_model_dir), "--ratio", "0.5", "--out", str(out)], capsys)
    assert code == 2 and "not an llm-pruner export" in io.err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_text_shorter_than_one_window(tiny_model_dir, tiny_data, capsys):
    code, io = run(["eval", str(tiny_model_dir), "--seqlen", "100000"], capsys)
    assert code == 2 and "fewer than one window" in io.err


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "search.cli", "eval", str(tmp_path / "no-such-model")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "model not found" in done.stderr and "Traceback" not in done.stderr


def test_importance_is_computed_once_per_model_and_calibration(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                               monkeypatch):
    argv = [*PRUNE, "--model", str(tiny_model_dir), "--importance", "wanda-sp"]
    assert run([*argv, "--ratio", "0.7", "--out", str(tmp_path / "a")], capsys)[0] == 0

    def must_not_run(*args, **kwargs):
        raise AssertionError("importance was computed again")

    monkeypatch.setattr("space.scores.cache.compute_scores", must_not_run)
    code, io = run([*argv, "--ratio", "0.5", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, io.err
    with pytest.raises(AssertionError, match="computed again"):  # another calibration seed: recomputed
        run([*argv, "--ratio", "0.5", "--seed", "1", "--out", str(tmp_path / "c")], capsys)


def test_prune_by_parts_and_by_method_run_the_same_pipeline(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                            monkeypatch):
    """``--importance/--allocation/--reform`` is an anonymous recipe: both forms reach run_recipe."""
    from search.oneshot import pipeline

    seen = []
    real = pipeline.run_recipe

    def spy(loaded, recipe, **options):
        seen.append((recipe.name, recipe.importance, recipe.allocation, recipe.reform.method))
        return real(loaded, recipe, **options)

    monkeypatch.setattr(pipeline, "run_recipe", spy)
    by_parts = [*PRUNE, "--model", str(tiny_model_dir), "--ratio", "0.7", "--importance", "magnitude",
                "--allocation", "uniform", "--reform", "bias", "--out", str(tmp_path / "parts")]
    assert run(by_parts, capsys)[0] == 0
    by_method = [*PRUNE, "--model", str(tiny_model_dir), "--ratio", "0.7", "--method", "magnitude-sp",
                 "--out", str(tmp_path / "method")]
    assert run(by_method, capsys)[0] == 0
    assert seen == [(None, "magnitude", "uniform", "bias"), ("magnitude-sp", "magnitude", "uniform", "none")]
    for folder in ("parts", "method"):
        record = json.loads((tmp_path / folder / "subnet.json").read_text())
        assert set(record["recipe"]) >= {"method", "importance", "allocation", "compensation", "reform", "calibration"}
        assert (tmp_path / folder / "importance.pt").is_file()


@pytest.mark.parametrize("argv, message", [
    (["eval", "{model}", "--ppl", "nosuch"], "unknown dataset"),
    (["eval", "{model}", "--batch-size", "0"], "at least 1"),
    (["prune", "--model", "{model}", "--ratio", "0.5", "--out", "{tmp}/out", "--batch-size", "0"], "at least 1"),
    (["prune", "--model", "{model}", "--ratio", "0.5", "--out", "{tmp}/out", "--calib", "wikitext2:test"], "leak"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/file"], "not a folder"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--final-top-k", "0"], "final-top-k"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--eval-windows", "-1"],
     "eval-windows"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--mlp-step", "-8"], "mlp-step"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--fitness", "bleu"], "--fitness"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--max-failures", "0"],
     "max-failures"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--trial-timeout", "0"],
     "trial-timeout"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--gpus-per-worker", "0"],
     "--gpus-per-worker must be a whole number of GPUs, at least 1"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--storage", "notaurl"],
     "not a database URL"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--calib", "wikitext2+ptb:test"],
     "leak"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--order-calib",
      "wikitext2+ptb:test"], "leak"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--evolution", "staged",
      "--fitness-nsamples", "8"], "fitness-nsamples"),
    (["search", "--model", "{model}", "--ratio", "0.3", "--run-dir", "{tmp}/run", "--preset", "paper",
      "--eval-windows", "0"], "needs a wider preset"),
    (["search", "--method", "tyr", "--config", "{tmp}/file", "--run-dir", "{tmp}/run"], "give one of them"),
    (["prune", "--model", "{model}", "--ratio", "0.5", "--out", "{tmp}/out", "--method", "tyr"],
     "search --method tyr"),
    (["prune", "--out", "{tmp}/out"], "--model and --ratio are required"),
    (["prune", "--config", "{tmp}/nofile.yaml", "--out", "{tmp}/out"], "no such file"),
    (["prune", "--config", "{tmp}/file", "--out", "{tmp}/out"], "must map options"),
])
def test_bad_inputs_end_in_one_message_and_exit_2(argv, message, tiny_model_dir, tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("not a run folder")
    before = sorted(tmp_path.rglob("*"))
    code, io = run([a.format(model=tiny_model_dir, tmp=tmp_path) for a in argv], capsys)
    assert code == 2, io.err
    assert message in io.err and "Traceback" not in io.err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created


@pytest.mark.parametrize("argv, message", [
    (["recover", "{tmp}/export", "--out", "{tmp}/out"], "pip install 'llm-pruner[recover]'"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--workers", "2", "--eval-windows", "0"],
     "pip install 'llm-pruner[ray]'"),
    (["search", "--model", "{model}", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--device", "cuda",
      "--gpus-per-worker", "2", "--solver-device", "cpu", "--eval-windows", "0"], "pip install 'llm-pruner[multi-gpu]'"),
    (["dashboard", "{tmp}/run"], "pip install 'llm-pruner[dashboard]'"),
])
def test_a_command_that_needs_a_missing_extra_names_it(argv, message, tiny_model_dir, tiny_data, tmp_path, capsys,
                                                      monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "ray", "optuna_dashboard", "accelerate") else real(name, *a))
    code, io = run([a.format(model=tiny_model_dir, tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and message in io.err and "Traceback" not in io.err


def test_a_runs_config_yaml_re_runs_it_and_flags_override_it(tiny_model_dir, tiny_data, tmp_path, capsys):
    from search.cli.search import config_from, add
    import argparse

    parser = argparse.ArgumentParser()
    add(parser.add_subparsers())
    base = ["search", "--model", str(tiny_model_dir), "--ratio", "0.6", "--run-dir", str(tmp_path / "a"),
            "--evolution", "tiny", "--fitness", "kl", "--nsamples", "8", "--calib-seqlen", "32"]
    first = config_from(parser.parse_args(base))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(first.to_dict()))
    again = config_from(parser.parse_args(["search", "--config", str(tmp_path / "config.yaml"), "--run-dir", "b"]))
    assert again == first  # the same search, identically
    changed = config_from(parser.parse_args(["search", "--config", str(tmp_path / "config.yaml"), "--run-dir", "b",
                                             "--trials", "7", "--nsamples", "16"]))
    assert changed.trials == 7 and changed.calibration["nsamples"] == 16 and changed.fitness == "kl"
    assert changed.calibration["seqlen"] == 32 and changed.fitness_windows == first.fitness_windows
    spread = config_from(parser.parse_args(["search", "--config", str(tmp_path / "config.yaml"), "--run-dir", "b",
                                            "--gpus-per-worker", "2"]))
    assert first.to_dict()["gpus_per_worker"] == 1 and spread.to_dict()["gpus_per_worker"] == 2  # recorded
    assert spread.identity() == first.identity()  # how a job runs, not what it searches: a run resumes with it
    (tmp_path / "bad.yaml").write_text("model: m\nratio: 0.5\nwhatever: 1\n")
    code, io = run(["search", "--config", str(tmp_path / "bad.yaml"), "--run-dir", str(tmp_path / "c")], capsys)
    assert code == 2 and "unknown: whatever" in io.err


def test_a_search_method_sets_the_flags_not_given(tiny_model_dir, tmp_path):
    from search.cli.search import config_from, add
    import argparse

    parser = argparse.ArgumentParser()
    add(parser.add_subparsers())
    base = ["search", "--model", str(tiny_model_dir), "--ratio", "0.6", "--run-dir", str(tmp_path / "a"), "--method", "tyr"]
    tyr = config_from(parser.parse_args(base))
    assert (tyr.importance, tyr.fitness, tyr.evolution, tyr.export_reform, tyr.trials) == (
        "osscar", "kl", "staged", "upstream", 260)
    assert tyr.staged is not None and tyr.calibration_spec("fitness_windows").nsamples == 4 * tyr.staged.pool
    mine = config_from(parser.parse_args([*base, "--fitness", "ppl", "--trials", "40"]))
    assert (mine.fitness, mine.trials, mine.importance) == ("ppl", 40, "osscar")


def own_calibration_data(folder):
    """A text file, a JSONL file and a save_to_disk folder of the tiny tokenizer's words."""
    from datasets import Dataset

    docs = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(20)) for i in range(30)]
    (folder / "notes.txt").write_text("\n\n".join(docs))
    (folder / "mine.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    Dataset.from_dict({"text": docs}).save_to_disk(folder / "saved")
    return [str(folder / "notes.txt"), f"{folder / 'mine.jsonl'}:text", f"hf:{folder / 'saved'}:text"]


def test_prune_calibrates_on_a_text_file_a_jsonl_field_and_a_datasets_folder(tiny_model_dir, tiny_data, tmp_path,
                                                                             capsys):
    sources = own_calibration_data(tmp_path)
    out = tmp_path / "pruned"
    code, io = run([*PRUNE, "--model", str(tiny_model_dir), "--ratio", "0.6", "--out", str(out),
                    "--calib", "+".join(sources)], capsys)
    assert code == 0, io.err
    calibration = json.loads((out / "subnet.json").read_text())["recipe"]["calibration"]
    assert calibration["dataset"] == "file+file+hf" and len(calibration["files"]) == 3
    assert calibration["split"].split("+") == [str(tmp_path / "notes.txt"), f"{tmp_path / 'mine.jsonl'}:text",
                                               f"{tmp_path / 'saved'}:text"]


@pytest.mark.parametrize("command", ["prune", "search"])
def test_no_chat_template_or_too_little_text_is_said_before_the_model_loads(command, tiny_model_dir, tiny_data,
                                                                            tmp_path, capsys, monkeypatch):
    import space.models

    sources = own_calibration_data(tmp_path)
    monkeypatch.setattr(space.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    where = ["--out", str(tmp_path / "out")] if command == "prune" else ["--run-dir", str(tmp_path / "run"),
                                                                         "--eval-windows", "0"]
    base = [command, "--model", str(tiny_model_dir), "--ratio", "0.6", *where, "--calib", sources[2]]
    code, io = run([*base, "--chat-template"], capsys)
    assert code == 2 and "no chat template" in io.err and "Traceback" not in io.err
    code, io = run([*base, "--calib-seqlen", "1024"], capsys)
    assert code == 2 and f"too little calibration text: hf:{tmp_path / 'saved'}:text has 600 tokens" in io.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_search_records_its_own_calibration_data_and_chat_template(tiny_model_dir, tiny_data, tmp_path):
    from search.cli.search import config_from, add
    import argparse

    sources = own_calibration_data(tmp_path)
    parser = argparse.ArgumentParser()
    add(parser.add_subparsers())
    first = config_from(parser.parse_args(["search", "--model", str(tiny_model_dir), "--ratio", "0.6", "--run-dir",
                                           "a", "--calib", sources[2], "--chat-template"]))
    assert all(getattr(first, which)["chat_template"] for which in ("calibration", "fitness_windows", "final_windows"))
    assert first.calibration["dataset"] == "hf" and first.calibration_spec().chat_template
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(first.to_dict()))
    again = config_from(parser.parse_args(["search", "--config", str(tmp_path / "config.yaml"), "--run-dir", "b"]))
    assert again == first
    changed = config_from(parser.parse_args(["search", "--config", str(tmp_path / "config.yaml"), "--run-dir", "b",
                                             "--nsamples", "16"]))
    assert changed.calibration["chat_template"] and changed.calibration["nsamples"] == 16
