"""experiments/configs/<script>/*.yaml: the settings of every results table, as a YAML file its script
reads with ``--config``. Each file parses through its script's own ``parse_args`` (no model loads):
every key is an option of the script today and holds the file's value, so renaming an option a
table's file uses fails here; an unknown key is one clear usage error (exit status 2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
CONFIGS = sorted(p for p in (EXPERIMENTS / "configs").glob("*/*.yaml") if p.parent.name != "quality")
_loaded = {}


def script(stem: str, monkeypatch):
    """experiments/<stem>.py as a module (its ``__main__`` block does not run)."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # compare.py imports compare_report as a sibling script
    if stem not in _loaded:
        spec = importlib.util.spec_from_file_location(f"experiment_script_{stem}", EXPERIMENTS / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[stem] = module
    return _loaded[stem]


def same(parsed, value) -> bool:
    """The parsed option equals the file's value (paths and numbers compared as what they name)."""
    if isinstance(value, list):
        return isinstance(parsed, list) and len(parsed) == len(value) and all(map(same, parsed, value))
    if isinstance(parsed, Path):
        return parsed == Path(value)
    return parsed == value


def test_every_table_script_has_a_config():
    assert {p.parent.name for p in CONFIGS} >= {
        "compare", "foundation", "reform_table", "orders", "search_table", "robustness", "scale", "throughput",
        "solver_precision", "fitness_rank", "llamacpp", "eval_exports", "calibration_size", "finalists"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_to_its_values(path, monkeypatch):
    lines = path.read_text().splitlines()
    header = "\n".join(lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert ".md" in lines[0] and f"--config experiments/configs/{path.parent.name}/{path.name}" in header
    values = yaml.safe_load(path.read_text())
    args = script(path.parent.name, monkeypatch).parse_args(["--config", str(path)])
    assert not hasattr(args, "config_file")
    for key, value in values.items():
        dest = key.replace("-", "_")
        assert hasattr(args, dest), f"{path}: {key} is no option of experiments/{path.parent.name}.py"
        assert same(getattr(args, dest), value), (key, getattr(args, dest), value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_unknown_key_is_a_usage_error(path, monkeypatch, tmp_path, capsys):
    bad = tmp_path / path.name
    bad.write_text(path.read_text() + "no_such_option: 1\n")
    with pytest.raises(SystemExit) as exc:
        script(path.parent.name, monkeypatch).parse_args(["--config", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option(s) no_such_option" in err and str(bad) in err


def test_flags_given_override_the_file(monkeypatch):
    foundation = script("foundation", monkeypatch)
    path = EXPERIMENTS / "configs" / "foundation" / "foundation.yaml"
    assert foundation.parse_args(["--config", str(path), "--windows", "4"]).windows == 4
    assert foundation.parse_args(["--config", str(path)]).windows == 8
    assert foundation.parse_args([]).windows == 32


def test_positional_models_from_the_file(monkeypatch, tmp_path, capsys):
    """eval_exports.py needs its models: from the command line or from the file."""
    exports = script("eval_exports", monkeypatch)
    assert exports.parse_args(["a", "b"]).models == ["a", "b"]
    (tmp_path / "c.yaml").write_text("models: [a, b]\n")
    assert exports.parse_args(["--config", str(tmp_path / "c.yaml")]).models == ["a", "b"]
    with pytest.raises(SystemExit) as exc:
        exports.parse_args([])
    assert exc.value.code == 2 and "required: models" in capsys.readouterr().err
