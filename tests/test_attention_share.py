"""experiments/attention_share.py: a candidate gives every layer's attention the one shape asked for and
stays on the budget, the MLP profile it starts from surviving (wider layers stay wider); a folder that
is not a finished run is one clear error (exit status 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from space.subnet import LayerWidths, ModelDims, Subnet

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DIMS = ModelDims(num_layers=6, hidden_size=576, head_dim=64, num_heads=9, num_kv_heads=3, intermediate_size=1536)


@pytest.mark.parametrize("shape", [(3, 1), (2, 2), (2, 3), (3, 3)])
def test_every_layer_takes_the_shape_on_the_budget(monkeypatch, shape):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import attention_share

    profile = Subnet(DIMS, [LayerWidths(3, 2, c) for c in (1280, 640, 384, 512, 768, 896)])
    candidate = attention_share.with_attention(profile, shape, 0.5, 32)
    assert {(w.kv_heads, w.q_per_kv) for w in candidate.layers} == {shape}
    assert candidate.ratio() == pytest.approx(0.5, rel=0.005)
    channels = [w.channels for w in candidate.layers]
    assert all(c % 32 == 0 for c in channels)
    order = sorted(range(6), key=lambda i: profile.layers[i].channels)
    assert [channels[i] for i in order] == sorted(channels)  # the profile's order kept


def test_a_folder_without_a_finished_search_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import attention_share
    from search.cli.common import exit_status

    assert exit_status(attention_share.main, [str(tmp_path)]) == 2
    assert "not a finished search run folder" in capsys.readouterr().err
