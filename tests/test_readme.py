"""The README's Python API example, run as it is written (on the real SmolLM2-135M and data)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_is_found():
    code = api_example()
    assert "search.prune(" in code and "search.run_search(" in code and "evaluators.evaluate(" in code


@pytest.mark.real
@pytest.mark.slow
def test_readme_python_api_example_runs(real_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(api_example(), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"block ratio 0\.70\d", out), out
    assert (tmp_path / "runs" / "api-0.7" / "subnet.json").is_file()
    assert (tmp_path / "runs" / "api-search-0.7" / "best.json").is_file()
    assert float(re.search(r"WikiText-2 perplexity ([\d.]+)", out).group(1)) < 200
    assert os.environ["LLM_PRUNER_DATA"]
