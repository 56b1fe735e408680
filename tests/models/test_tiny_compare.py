"""``agree_until_near_tie``: how the bf16 GPU tests compare a patched run with the unpatched model."""

from __future__ import annotations

import pytest
import torch

from moert.models.tiny import agree_until_near_tie


def _run(steps: int = 5, batch: int = 2, vocab: int = 7, seed: int = 0):
    """(seq (B, 3+N), logits (N, B, V)) with clear winners (margin 1.0) and tokens = argmax."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(steps, batch, vocab, generator=g) * 0.5
    win = torch.randint(0, vocab, (steps, batch), generator=g)
    logits.scatter_(2, win.unsqueeze(-1), 1.5)
    seq = torch.cat([torch.zeros(batch, 3, dtype=torch.long), win.T], dim=1)
    return seq, logits


def test_identical_runs_compare_every_step():
    seq, logits = _run()
    assert agree_until_near_tie(seq, logits, seq.clone(), logits.clone()) == [5, 5]


def test_a_flipped_token_at_a_near_tie_ends_the_row_there():
    seq, logits = _run()
    ref_logits = logits.clone()
    ref_logits[2, 0, int(seq[0, 5])] = ref_logits[2, 0].topk(2).values[1] + 1e-3  # step 2 of row 0: a tie
    got_seq = seq.clone()
    got_seq[0, 5:] = (got_seq[0, 5:] + 1) % 7  # the run took the other token there, and diverged after
    got_logits = ref_logits.clone()
    got_logits[3:, 0] = torch.rand(2, 7)  # different prefixes: anything
    assert agree_until_near_tie(seq, ref_logits, got_seq, got_logits) == [3, 5]


def test_a_flipped_token_without_a_tie_fails_naming_the_step():
    seq, logits = _run()
    got = seq.clone()
    got[1, 4] = (got[1, 4] + 1) % 7
    with pytest.raises(AssertionError, match="row 1 step 1: token"):
        agree_until_near_tie(seq, logits, got, logits)


def test_logits_beyond_tolerance_fail_while_the_prefix_is_shared():
    seq, logits = _run()
    got = logits.clone()
    got[4, 1, 0] += 0.1  # tol = 2e-2 * 1.5 = 0.03
    with pytest.raises(AssertionError, match="row 1 step 4: logits differ"):
        agree_until_near_tie(seq, logits, seq, got)
