"""Logits formed chunk by chunk: a chunk holds at most ``LOGIT_ROWS`` (window, position) rows of the
batch together, and the NLL and the KL summed over the chunks are those of the whole logits."""

import sys

import pytest
import torch
import torch.nn.functional as F

from evaluators.divergence import batch_kl, reference
from evaluators.perplexity import batch_nll, logit_chunks

# the module, not the function ``evaluators.perplexity`` that the package exports under the same name
perplexity_module = sys.modules["evaluators.perplexity"]


@pytest.mark.parametrize("rows", [12, 5, 2])
def test_logit_chunks_bound_their_rows_and_sum_to_the_whole_logits(make_model, token_ids, monkeypatch, rows):
    model = make_model("llama").double()
    monkeypatch.setattr(perplexity_module, "LOGIT_ROWS", rows)
    batch, positions = token_ids.shape[0], token_ids.shape[1] - 1
    with torch.no_grad():
        whole = model(token_ids).logits[:, :-1].float()
        chunks = list(logit_chunks(model, token_ids))
    assert [start for start, _ in chunks] == list(range(0, positions, max(1, rows // batch)))
    assert all(logits.shape[0] * logits.shape[1] <= max(rows, batch) for _, logits in chunks)
    torch.testing.assert_close(torch.cat([logits for _, logits in chunks], dim=1), whole)
    nll, count = batch_nll(model, token_ids)
    direct = F.cross_entropy(whole.reshape(-1, whole.shape[-1]), token_ids[:, 1:].reshape(-1), reduction="sum")
    assert count == batch * positions and nll == pytest.approx(float(direct), rel=1e-6)
    ref = reference(make_model("llama", seed=1).double(), token_ids, top_k=16, batch_size=batch)
    kl_chunked, _ = batch_kl(model, token_ids, ref.log_probs[0], ref.ids[0], ref.log_rest[0])
    monkeypatch.setattr(perplexity_module, "LOGIT_ROWS", batch * positions)  # one chunk: the whole logits
    kl_whole, _ = batch_kl(model, token_ids, ref.log_probs[0], ref.ids[0], ref.log_rest[0])
    assert kl_chunked == pytest.approx(kl_whole, rel=1e-6)  # float32 sums in another order and kl_whole > 0
