"""``moert trace`` capture on tiny random models: routing equals the router applied directly,
scores and normed rows match, and generation is unchanged by the hooks."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from moert.cli import trace as trace_cli
from moert.models.tiny import prompt_ids, save_tiny, tiny_model
from moert.trace import open_trace
from moert.trace.record import RoutingRecorder, capture, generate_and_record

MODEL_TYPES = ["deepseek_v2", "qwen3_moe", "phimoe"]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def saved_model(request, tmp_path_factory):
    """A tiny random model saved and reloaded (from_pretrained round trip)."""
    from transformers import AutoModelForCausalLM

    path = save_tiny(tiny_model(request.param), tmp_path_factory.mktemp(request.param))
    return AutoModelForCausalLM.from_pretrained(path).eval(), path


def test_capture_matches_router_applied_directly(saved_model, tmp_path):
    model, _ = saved_model
    recorder = RoutingRecorder(model, with_scores=True, with_hidden=True)
    # independent taps: the router's input (post-attention normed rows) and each layer's input
    router_in = {i: [] for i in range(len(recorder.refs))}
    layer_in = {i: [] for i in range(len(recorder.refs))}
    taps = []
    for i, ref in enumerate(recorder.refs):
        taps.append(
            ref.router.register_forward_pre_hook(lambda m, a, i=i: router_in[i].append(a[0].detach().clone()))
        )
        taps.append(
            ref.layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: layer_in[i].append(
                    (a[0] if a else kw["hidden_states"]).detach().clone()
                ),
                with_kwargs=True,
            )
        )
    try:
        with recorder, torch.no_grad():
            seq = generate_and_record(model, recorder, prompt_ids(length=7)[0], max_new_tokens=5, seq_id=3)
    finally:
        for t in taps:
            t.remove()
    T = seq.num_tokens
    assert T == 7 + 5 - 1 and seq.is_prefill.sum() == 7
    for i, ref in enumerate(recorder.refs):
        x = torch.cat([r.reshape(-1, r.shape[-1]) for r in router_in[i]])  # [T, H]
        with torch.no_grad():
            logits, _, want = ref.router(x)  # the model's own routing rule, applied directly
        assert torch.equal(seq.experts[i].sort(-1).values, want.sort(-1).values), f"layer {ref.index}"
        want_scores = F.linear(x.float(), ref.router.weight.float()).softmax(-1)
        torch.testing.assert_close(seq.scores[i], want_scores, rtol=1e-5, atol=1e-6)
        rows = torch.cat([h.reshape(-1, h.shape[-1]) for h in layer_in[i]])
        with torch.no_grad():
            want_hidden = ref.norm(rows).half()
        assert torch.equal(seq.hidden[i], want_hidden), (
            f"layer {ref.index}: worst {(seq.hidden[i].float() - want_hidden.float()).abs().max()}"
        )


def test_hooks_do_not_change_generation(saved_model):
    model, _ = saved_model
    ids = prompt_ids(length=6)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        with RoutingRecorder(model, with_scores=True, with_hidden=True) as rec:
            hooked = generate_and_record(model, rec, ids[0], max_new_tokens=6, seq_id=0)
        again = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(hooked.token_ids, plain[0, :-1])
    assert torch.equal(plain, again)  # hooks removed on exit


def test_capture_writes_a_readable_trace(saved_model, tmp_path):
    model, _ = saved_model
    prompts = [prompt_ids(length=n, seed=n)[0] for n in (3, 5)]
    meta = capture(model, prompts, tmp_path / "t", max_new_tokens=3, with_scores=True)
    trace = open_trace(tmp_path / "t")
    assert trace.meta == meta and meta.num_sequences == 2 and meta.num_tokens == (3 + 2) + (5 + 2)
    assert meta.has_scores and not meta.has_hidden
    seqs = list(trace.sequences())
    assert [s.seq_id for s in seqs] == [0, 1]
    assert seqs[0].scores.shape == (meta.num_layers, 5, meta.num_experts)


def test_cli_capture_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = save_tiny(tiny_model("qwen3_moe"), tmp_path / "m")
    vocab = {f"w{i}": i for i in range(159)} | {"[UNK]": 159}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    (tmp_path / "p.txt").write_text("w1 w2 w3\n\nw4 w5\n")
    parser = argparse.ArgumentParser()
    trace_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(path),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--max-new-tokens",
            "2",
            "--out",
            str(tmp_path / "t"),
            "--with-hidden",
        ]
    )
    assert trace_cli.run(args) == 0
    trace = open_trace(tmp_path / "t")
    assert trace.meta.num_sequences == 2 and trace.meta.has_hidden
    assert [s.token_ids[:3].tolist() for s in trace.sequences()][0] == [1, 2, 3]
