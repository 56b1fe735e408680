"""Online predictor stats of a patched model: coverage (the router's experts that were in the
prefetched top-(k+m)) is not recall@k (the predicted top-k that the router chose)."""

from __future__ import annotations

import moert
from moert.models.tiny import greedy, prompt_ids, random_predictor, single_thread, tiny_model


def test_coverage_counts_the_prefetched_set_not_the_top_k():
    model = tiny_model("deepseek_v2", topk_method="greedy")
    prompt = prompt_ids(batch=1, length=6, vocab=model.config.vocab_size)
    with single_thread():
        handle = moert.patch(
            model,
            cache_experts=0.5,
            device="cpu",
            policy="score",
            predictor=random_predictor(model),
            overprovision=4,
        )
        greedy(model, prompt, 8)
        st = handle.stats()
        handle.undo()
    assert st.recall is not None and st.coverage is not None
    # top-k is inside top-(k+4): never less covered; a random predictor covers strictly more
    for layer, row in st.per_layer.items():
        assert row.coverage >= row.recall, (layer, row.coverage, row.recall)
    assert st.coverage > st.recall, (st.coverage, st.recall)
    assert st.misses > 0
