"""The search's configuration: every check made before a model loads, and the disjoint regions of
calibration text its statistics, fitness and re-scoring windows come from."""

import dataclasses
from pathlib import Path

import pytest
import torch

from evaluators import environment
from evaluators.data import CalibrationSpec, calibration_text, region_bounds, region_starts
from search.config import SearchConfig
from search.defaults import MIXED_EXPORT_MIN_RATIO
from space.errors import UserError


def test_calibration_regions_are_disjoint_and_recorded(tiny_data):
    """The search's statistics, fitness and re-scoring windows never share a token."""
    config = SearchConfig.create("m", 0.5, nsamples=64, calib_seqlen=16, fitness_nsamples=32, fitness_seqlen=16)
    count = 5000
    taken = {}
    for name in ("calibration", "fitness_windows", "final_windows"):
        spec = config.calibration_spec(name)
        assert config.to_dict()[name]["region"] == list(spec.region)  # recorded in config.yaml
        for seed in range(5):
            starts = region_starts(count, nsamples=spec.nsamples, seqlen=spec.seqlen, seed=seed, region=spec.region)
            positions = {int(s) + i for s in starts for i in range(spec.seqlen)}
            low, high = region_bounds(count, spec.region)
            assert min(positions) >= low and max(positions) < high
            taken[name] = taken.get(name, set()) | positions
    names = list(taken)
    assert all(not taken[a] & taken[b] for a in names for b in names if a < b)
    assert CalibrationSpec("wikitext2", 4, 16, region=(0.0, 0.5)).overlaps(CalibrationSpec("wikitext2", 4, 16))
    assert not CalibrationSpec("wikitext2", 4, 16, region=(0.0, 0.5)).overlaps(CalibrationSpec("ptb", 4, 16))
    whole = CalibrationSpec("wikitext2", 4, 16)
    assert "region" not in whole.to_dict()  # the records and cache keys of whole-text specs are unchanged
    assert CalibrationSpec.from_dict(config.fitness_windows) == config.calibration_spec("fitness_windows")
    assert calibration_text("wikitext2")


def test_a_search_with_overlapping_windows_is_refused():
    whole = {"dataset": "wikitext2", "split": "validation", "nsamples": 4, "seqlen": 32, "seed": 0}
    config = SearchConfig(model="m", ratio=0.5, calibration=whole, fitness_windows={**whole, "seed": 1})
    with pytest.raises(UserError, match="overlapping text"):
        config.check()


def test_calibration_from_two_sources_shares_its_windows_and_regions(tiny_text_dir, tmp_path, monkeypatch):
    import shutil

    from tests.conftest import tiny_tokenizer

    data = tmp_path / "data"
    shutil.copytree(tiny_text_dir, data)
    (data / "ptb" / "ptb.valid.txt").write_text((data / "ptb" / "ptb.test.txt").read_text())
    monkeypatch.setenv("LLM_PRUNER_DATA", str(data))
    spec = CalibrationSpec("wikitext2+ptb:validation", 5, 16, 0, (0.0, 0.6))
    assert spec.to_dict()["dataset"] == "wikitext2+ptb" and spec.to_dict()["split"] == "validation+validation"
    assert CalibrationSpec.from_dict(spec.to_dict()) == CalibrationSpec("wikitext2:validation+ptb:validation", 5, 16, 0,
                                                                        (0.0, 0.6))
    tokenizer = tiny_tokenizer()
    windows = spec.windows(tokenizer)
    alone = [CalibrationSpec(part, n, 16, 0, (0.0, 0.6)).windows(tokenizer)
             for part, n in (("wikitext2", 3), ("ptb:validation", 2))]
    assert windows.shape == (5, 16) and (windows == torch.cat(alone)).all()  # 3 + 2, each from its own text
    assert spec.overlaps(CalibrationSpec("ptb:validation", 4, 16, region=(0.5, 1.0)))
    assert not spec.overlaps(CalibrationSpec("ptb:validation", 4, 16, region=(0.6, 1.0)))
    with pytest.raises(UserError, match="leak"):
        CalibrationSpec("wikitext2+ptb:test", 4, 16).check_text()


def test_every_results_config_is_a_valid_search_config():
    """experiments/configs/quality/ holds the searches of the results tables; each still loads and checks
    (configs/compare/ holds compare.py's own options, read by its parser)."""
    from search.rundir import load_config_file

    folder = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "quality"
    files = sorted(folder.rglob("*.yaml"))
    assert files
    for path in files:
        load_config_file(path).check()


def test_the_defaults_of_the_day_and_the_order_by_ratio():
    from search.defaults import ORDER_SWITCH_RATIO

    low, high = SearchConfig.create("m", 0.5), SearchConfig.create("m", 0.7)
    for config in (low, high):
        # staged-8 as quality.md's last8 row measured it: 340 children, 84 fitness windows, 64 to re-score
        assert (config.fitness, config.evolution, config.export_reform, config.trials) == \
            ("kl", "staged-8", "upstream", 340)
        assert (config.fitness_windows["nsamples"], config.final_windows["nsamples"]) == (84, 64)
        config.check()
    # a preset given on its own takes its own sizes
    staged = SearchConfig.create("m", 0.5, evolution="staged")
    assert (staged.trials, staged.fitness_windows["nsamples"], staged.final_windows["nsamples"]) == (260, 84, 64)
    assert (low.importance, high.importance) == ("osscar", "wanda-sp")
    assert SearchConfig.create("m", ORDER_SWITCH_RATIO).importance == "osscar"
    # what is given wins; None is "not given" (the command line's unset flags)
    plain = SearchConfig.create("m", 0.5, fitness="ppl", evolution="cpu", importance="wanda-sp", trials=None)
    assert (plain.fitness, plain.evolution, plain.importance, plain.trials) == ("ppl", "cpu", "wanda-sp", 100)
    assert SearchConfig.create("m", 0.5, searcher="tpe").trials == 100
    assert SearchConfig.create("m", 0.5, importance="auto").importance == "osscar"


def test_a_config_file_and_the_command_line_get_the_same_defaults(tmp_path):
    import argparse

    import yaml

    from search.cli import search as search_cli

    parser = argparse.ArgumentParser()
    search_cli.add(parser.add_subparsers())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "ratio": 0.5}))
    from_file = search_cli.config_from(parser.parse_args(["search", "--config", str(path), "--run-dir", "r"]))
    from_flags = search_cli.config_from(parser.parse_args(["search", "--model", "m", "--ratio", "0.5", "--run-dir", "r"]))
    assert from_file == from_flags == SearchConfig.create("m", 0.5, eval_windows=32)
    path.write_text(yaml.safe_dump({"ratio": 0.5}))
    with pytest.raises(UserError, match="must set model and ratio"):
        search_cli.config_from(parser.parse_args(["search", "--config", str(path), "--run-dir", "r"]))


def test_the_osscar_order_takes_its_own_windows_by_default(tmp_path):
    import argparse

    import yaml

    from search.cli import search as search_cli

    low, high = SearchConfig.create("m", 0.5), SearchConfig.create("m", 0.7)
    assert (low.importance, low.order_nsamples, low.calibration["nsamples"]) == ("osscar", 256, 64)
    assert low.order_calibration_spec() == dataclasses.replace(low.calibration_spec(), nsamples=256)
    assert high.importance == "wanda-sp" and high.order_nsamples is None  # the statistics' own windows
    assert SearchConfig.create("m", 0.7, importance="osscar").order_nsamples == 256
    # given wins; a count equal to the statistics' (or more statistics) is recorded as None, as before the field
    assert SearchConfig.create("m", 0.5, order_nsamples=128).order_nsamples == 128
    assert SearchConfig.create("m", 0.5, order_nsamples=64).order_nsamples is None
    assert SearchConfig.create("m", 0.5, nsamples=256).order_nsamples is None
    # a run folder's config.yaml with a null order (the statistics' windows) re-runs that search, not today's
    parser = argparse.ArgumentParser()
    search_cli.add(parser.add_subparsers())
    path = tmp_path / "config.yaml"
    for recorded in (SearchConfig.create("m", 0.5, order_nsamples=64), SearchConfig.create("m", 0.5, nsamples=256)):
        path.write_text(yaml.safe_dump(recorded.to_dict()))
        assert search_cli.config_from(parser.parse_args(["search", "--config", str(path), "--run-dir", "r"])) == recorded


def test_the_export_fits_on_its_own_count_of_statistics_windows():
    config = SearchConfig.create("m", 0.5, nsamples=8, export_nsamples=32)
    export, statistics = config.export_calibration_spec(), config.calibration_spec()
    assert export.nsamples == 32 and (export.dataset, export.seed, export.region, export.seqlen) == \
        (statistics.dataset, statistics.seed, statistics.region, statistics.seqlen)
    assert "export_nsamples" not in config.identity()  # a run resumes with another count: it is the export's
    # ...and with another least-squares mode for the export: the trials never use it
    assert SearchConfig.create("m", 0.5, export_reform="local").identity() == SearchConfig.create("m", 0.5).identity()
    with pytest.raises(UserError, match="--export-nsamples"):
        SearchConfig.create("m", 0.5, export_nsamples=0).check()


def test_the_export_is_fitted_on_256_windows_by_default():
    config = SearchConfig.create("m", 0.5)
    assert config.export_nsamples == 256 and config.calibration_spec().nsamples == 64
    assert SearchConfig.create("m", 0.5, export_nsamples=64).export_nsamples == 64


def test_the_exports_pass_dtype_is_the_upstream_modes_and_its_selection_needs_that_mode():
    """bfloat16 passes by default in the upstream mode; a config with another mode keeps working
    (its passes run in float32); a unit re-selection outside the upstream mode is a usage error."""
    assert SearchConfig.create("m", 0.5, export_pass_dtype="bfloat16").export_spec().pass_dtype == "bfloat16"
    local = SearchConfig.create("m", 0.5, export_reform="local")
    local.check()
    assert local.export_spec().pass_dtype == "float32"
    assert "select" not in SearchConfig.create("m", 0.5).export_spec().to_dict()  # the prefix: unrecorded
    with pytest.raises(UserError, match="mode upstream"):
        SearchConfig.create("m", 0.5, export_reform="local", export_select="obs").check()


def test_the_searchs_own_pass_dtype_is_part_of_the_search_and_older_folders_read_float32():
    """--pass-dtype changes the unit order and the fitness's statistics: a run resumes only with its own
    (identity), and a run folder made before the field meant float32."""
    assert SearchConfig(model="m", ratio=0.5).pass_dtype == "float32"
    assert "pass_dtype" in SearchConfig.create("m", 0.5).identity()
    auto = SearchConfig.create("m", 0.5, pass_dtype="auto")
    assert auto.pass_dtype == SearchConfig.create("m", 0.5, dtype="auto").dtype
    with pytest.raises(UserError, match="--pass-dtype must be one of float32, bfloat16"):
        SearchConfig.create("m", 0.5, pass_dtype="float16").check()


@pytest.mark.parametrize("speedup, expected", [(3.0, "bfloat16"), (1.1, "float32"), (0.01, "float32")])
def test_the_dtypes_default_to_bfloat16_only_where_its_matmuls_are_fast(monkeypatch, speedup, expected):
    """auto (the default scoring dtype and the upstream export's passes) is bfloat16 on a GPU and on a CPU
    where its matmuls measure at least BFLOAT16_MIN_SPEEDUP times float32's (AVX-512 BF16, AMX), float32 on
    other CPUs (AVX-512 without BF16: no faster; AVX2: bfloat16 2.4x slower a candidate), resolved into the
    config; an explicit dtype is kept whatever the machine."""
    monkeypatch.setattr(environment, "bfloat16_speedup", lambda: speedup)
    config = SearchConfig.create("m", 0.5)
    assert config.dtype == config.export_pass_dtype == expected
    assert config.to_dict()["dtype"] == expected  # recorded: a resume runs in the dtype it began with
    assert SearchConfig.create("m", 0.5, dtype="auto", export_pass_dtype="auto").dtype == expected
    on_gpu = SearchConfig.create("m", 0.5, device="cuda")
    if not torch.cuda.is_available():  # a GPU worker's, planned from a machine without one
        assert on_gpu.dtype == on_gpu.export_pass_dtype == "bfloat16"
    kept = SearchConfig.create("m", 0.5, dtype="bfloat16", export_pass_dtype="float32")
    assert (kept.dtype, kept.export_pass_dtype) == ("bfloat16", "float32")


def test_the_exports_selection_auto_re_selects_units_on_mixed_text_only():
    """export_select auto (the default) is obs where the upstream export fits on text of several sources
    (the default above MIXED_EXPORT_MIN_RATIO, or a user's own mix) over an order not made by the refit
    error (osscar's is: the default at and below ORDER_SWITCH_RATIO), the prefix on one text, over such
    an order or outside the upstream mode (a local export stays valid); an explicit choice is kept."""
    assert SearchConfig.create("m", 0.7).export_spec().select == "obs"
    assert SearchConfig.create("m", MIXED_EXPORT_MIN_RATIO).export_spec().select == "prefix"
    assert SearchConfig.create("m", 0.5, export_calib="wikitext2+c4:calib").export_spec().select == "prefix"
    assert SearchConfig.create("m", 0.5, export_calib="wikitext2+c4:calib",
                               importance="wanda-sp").export_spec().select == "obs"
    assert SearchConfig.create("m", 0.7, importance="obs-elimination").export_spec().select == "prefix"
    assert SearchConfig.create("m", 0.7, calib="ptb").export_spec().select == "prefix"
    local = SearchConfig.create("m", 0.7, export_reform="local")
    local.check()
    assert local.export_spec().select == "prefix"
    assert SearchConfig.create("m", 0.7, export_select="prefix").export_spec().select == "prefix"
    assert SearchConfig.create("m", 0.5, export_select="obs").export_spec().select == "obs"
    assert SearchConfig.create("m", 0.7).identity() == SearchConfig.create("m", 0.7, export_select="prefix").identity()


def test_the_exports_ridge_and_its_size_are_its_own_and_go_with_the_mode():
    """--export-ridge/--export-damping change the export's least squares only (runtime fields: a search
    resumes with others); the damping defaults to the fitness's; a ridge toward the dense weights
    outside the local and upstream modes is a usage error."""
    default = SearchConfig.create("m", 0.7).export_spec()
    assert (default.ridge, default.damping) == ("zero", SearchConfig.create("m", 0.7).damping)
    dense = SearchConfig.create("m", 0.7, export_ridge="dense", export_damping=1e-2)
    assert (dense.export_spec().ridge, dense.export_spec().damping) == ("dense", 1e-2)
    assert dense.identity() == SearchConfig.create("m", 0.7).identity()
    with pytest.raises(UserError, match="ridge toward the dense"):
        SearchConfig.create("m", 0.7, export_reform="sequential", export_ridge="dense").check()


def test_the_exports_text_auto_adds_c4_beside_the_default_wikitext_only():
    """export_calib auto (the default): above MIXED_EXPORT_MIN_RATIO, WikiText-2 statistics are joined by
    c4:calib for the export (the same region and seed: never the fitness's or re-scoring's text), at or
    below it and for a user's own text the statistics' text alone; None (run folders made before the
    field) is the statistics' text."""
    auto = SearchConfig.create("m", 0.7).export_calibration_spec()
    assert auto.parts() == ["wikitext2:validation", "c4:calib"] and auto.nsamples == 256
    assert auto.region == SearchConfig.create("m", 0.7).calibration_spec().region
    assert SearchConfig.create("m", MIXED_EXPORT_MIN_RATIO).export_calibration_spec().parts() == ["wikitext2:validation"]
    own = SearchConfig.create("m", 0.7, calib="ptb").export_calibration_spec()
    assert own.parts() == ["ptb:validation"]
    before = SearchConfig.create("m", 0.5, export_calib=None)
    assert before.export_calibration_spec().parts() == before.calibration_spec().parts()
    with pytest.raises(UserError):
        SearchConfig.create("m", 0.5, export_calib="no-such-text").check()


def test_the_bfloat16_probe_measures_this_cpu():
    """The probe that ``auto`` rests on measures both dtypes here; where PyTorch has no fast bfloat16 kernels
    (AVX2 alone: generic kernels, about 1/100 of float32's rate) it must say so."""
    environment.bfloat16_speedup.cache_clear()
    speedup = environment.bfloat16_speedup()
    assert 0 < speedup < float("inf")
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert speedup < 1 and not environment.fast_bfloat16("cpu")


def test_a_data_seed_keeps_the_windows_and_changes_only_the_samplers_seed():
    windows = ("calibration", "fitness_windows", "final_windows")
    own = SearchConfig.create("m", 0.5, seed=0)
    repeated = SearchConfig.create("m", 0.5, seed=3, data_seed=0)
    assert repeated.seed == 3 and all(getattr(repeated, w) == getattr(own, w) for w in windows)
    assert [getattr(SearchConfig.create("m", 0.5, seed=3), w)["seed"] for w in windows] == [3, 4, 5]


def test_an_order_seed_draws_only_the_orders_windows_apart(tmp_path):
    import yaml

    from search.rundir import CONFIG, open_run_dir

    own, apart = SearchConfig.create("m", 0.5, seed=0), SearchConfig.create("m", 0.5, seed=0, order_seed=2)
    assert own.order_seed is None and own.order_calibration_spec().seed == 0
    assert apart.order_calibration_spec() == dataclasses.replace(own.order_calibration_spec(), seed=2)
    assert apart.calibration_spec() == own.calibration_spec()  # the statistics keep their windows
    # a run folder made before the field resumes as the statistics' seed, and refuses another order seed
    (tmp_path / CONFIG).write_text(yaml.safe_dump({k: v for k, v in own.to_dict().items() if k != "order_seed"}))
    open_run_dir(tmp_path, own)
    with pytest.raises(UserError, match="order_seed: run has None, asked 2"):
        open_run_dir(tmp_path, apart)


def test_an_order_text_changes_only_the_orders_windows():
    own = SearchConfig.create("m", 0.5, seed=1)
    mixed = SearchConfig.create("m", 0.5, seed=1, order_calib="wikitext2+c4:calib")
    assert mixed.order_calibration_spec() == dataclasses.replace(own.order_calibration_spec(),
                                                                 dataset="wikitext2+c4:calib")
    assert mixed.order_calibration_spec().parts() == ["wikitext2:validation", "c4:calib"]
    for which in ("calibration", "fitness_windows", "final_windows"):  # the search's own windows stay
        assert mixed.calibration_spec(which) == own.calibration_spec(which)
    assert mixed.export_calibration_spec() == own.export_calibration_spec()
    assert mixed.identity() != own.identity()  # another order is another search: a run folder will not resume it
    assert SearchConfig.create("m", 0.5, seed=1, order_calib="wikitext2") == own  # the statistics' text: the same search


def test_even_order_windows_are_the_same_for_every_seed():
    orders = [SearchConfig.create("m", 0.5, seed=seed, order_seed="even").order_calibration_spec() for seed in (0, 2)]
    assert orders[0] == orders[1] and orders[0].seed is None and orders[0].nsamples == 256
    assert orders[0].region == SearchConfig.create("m", 0.5).calibration_spec().region
    for wrong in ("odd", 1.5):
        with pytest.raises(UserError, match="order_seed is a seed"):
            SearchConfig.create("m", 0.5, order_seed=wrong).check()
