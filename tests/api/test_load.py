"""moert.load: checkpoint layouts (per-expert, fused, sharded), dtype, memory report, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moert
from moert.models.tiny import Reference, greedy, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return Reference("qwen3_moe-norm", tmp_path_factory.mktemp("load"))


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return Reference("deepseek_v2-group", tmp_path_factory.mktemp("load"))


def copy_dir(ref: Reference, tmp_path, name: str = "m"):
    dst = tmp_path / name
    shutil.copytree(ref.path, dst)
    return dst


def check_same(ref: Reference, model) -> None:
    seq, logits = greedy(model, ref.prompt)
    assert torch.equal(seq, ref.out[0]), "tokens differ from the unpatched model"
    err = ((logits - ref.out[1]).abs().max() / ref.out[1].abs().max()).item()
    assert err <= 1e-5, f"logits relative error {err:.3e}"


def test_report_and_memory(ds):
    model = moert.load(ds.path, cache_experts=0.25, progress=False)
    handle = moert.handle_of(model)
    rep = handle.load_report
    assert rep["device"] == "cpu" and rep["dtype"] == "float32"
    assert rep["cache_bytes"] == handle.cache_bytes == 8 * handle.layout.slab_bytes
    assert rep["all_experts_bytes"] == 2 * 16 * handle.layout.expert_bytes
    assert rep["peak_device_bytes"] == rep["non_expert_bytes"] + rep["cache_bytes"]
    assert rep["peak_device_bytes"] < rep["non_expert_bytes"] + rep["all_experts_bytes"]
    # no routed expert is a model parameter: they live in the pool only
    names = [n for n, _ in model.named_parameters()]
    assert not any(".mlp.experts." in n for n in names), [n for n in names if ".mlp.experts." in n]
    want = ds.model.state_dict()
    have = model.state_dict()
    assert all(torch.equal(want[k], v) for k, v in have.items())
    check_same(ds, model)
    handle.undo()


def test_fused_expert_keys(qwen, tmp_path):
    """A checkpoint holding fused experts.gate_up_proj / down_proj tensors loads the same."""
    dst = copy_dir(qwen, tmp_path)
    sd = {k: v.contiguous() for k, v in qwen.model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    (dst / "model.safetensors").unlink()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    model = moert.load(dst, cache_experts=6, progress=False)
    check_same(qwen, model)


def test_sharded_checkpoint(ds, tmp_path):
    dst = tmp_path / "sharded"
    ds.model.save_pretrained(dst, max_shard_size="200KB")
    assert (dst / "model.safetensors.index.json").is_file()
    assert len(list(dst.glob("*.safetensors"))) > 1
    model = moert.load(dst, cache_experts=0.5, policy="lfu", progress=False)
    check_same(ds, model)
    # a shard named in the index is missing
    shard = sorted(dst.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard\\(s\\) {shard.name}"):
        moert.load(dst, progress=False)


def test_bf16_dtype(ds):
    model = moert.load(ds.path, cache_experts=1.0, dtype=torch.bfloat16, progress=False)
    handle = moert.handle_of(model)
    assert handle.layout.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    seq, logits = greedy(model, ds.prompt, 4)
    assert seq.shape == (2, 10) and torch.isfinite(logits).all()


def test_missing_files_are_clear_errors(qwen, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        moert.load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        moert.load(empty)
    dst = copy_dir(qwen, tmp_path)
    (dst / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        moert.load(dst)


def test_missing_weights_are_clear_errors(qwen, tmp_path):
    dst = copy_dir(qwen, tmp_path)
    sd = load_file(str(dst / "model.safetensors"))
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights of expert 5 of layer 2"):
        moert.load(dst, progress=False)
    sd = load_file(str(qwen.path / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\).*model\.norm\.weight"):
        moert.load(dst, progress=False)


def test_unsupported_model_type_and_bad_cache(qwen, tmp_path):
    dst = copy_dir(qwen, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    with pytest.raises(ValueError, match="fewer than one layer's top-k"):
        moert.load(dst, cache_experts=2, progress=False)
    with pytest.raises(ValueError, match=r"not a fraction in \(0, 1\]"):
        moert.load(dst, cache_experts=1.01, progress=False)
    cfg["model_type"] = "mixtral"
    cfg["architectures"] = ["MixtralForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'mixtral'; supported: deepseek_v2, phimoe, qwen3_moe"):
        moert.load(dst, progress=False)


@pytest.mark.gpu
def test_cuda_load_peak_memory(ds):
    torch.cuda.empty_cache()
    model = moert.load(ds.path, cache_experts=0.25, device="cuda", dtype=torch.bfloat16, progress=False)
    rep = moert.handle_of(model).load_report
    assert rep["peak_method"].startswith("torch.cuda.max_memory_allocated")
    assert rep["peak_device_bytes"] < rep["non_expert_bytes"] + rep["all_experts_bytes"]
    seq, _ = greedy(model, ds.prompt.cuda(), 4)
    assert seq.shape == (2, 10)


def test_demo_on_a_model_directory(ds, capsys):
    from moert import cli

    rc = cli.main(
        ["demo", "--model", str(ds.path), "--tokens", "8", "--batch", "2", "--cache", "0.5", "--json"]
    )
    rec = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert rec["check"] == {**rec["check"], "checked": True, "tokens_identical": True}
    assert rec["check"]["logits_rel_err"] <= 1e-5
    assert rec["model_type"] == "deepseek_v2" and rec["cache_slots"] == 16
    assert set(rec["stats"]["per_layer"]) == {"1", "2"}
    assert rec["predictive"] is None  # --predictor auto trains only for the built-in model
    mem = rec["memory_bytes"]
    assert mem["device_with_offload"] < mem["device_without_offload"]


def test_demo_with_the_utility_policy(ds, capsys):
    from moert import cli

    rc = cli.main(["demo", "--model", str(ds.path), "--tokens", "8", "--policy", "utility", "--json"])
    rec = json.loads(capsys.readouterr().out)
    assert rc == 0 and rec["check"]["tokens_identical"] is True
    assert rec["stats"]["prefetches"] > 0 and rec["stats"]["misses"] > 0


def test_demo_default_cli(tmp_path):
    """`moert demo` (what `make demo` runs) on the built-in model, shortened to 4 tokens."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "moert", "demo", "--tokens", "4", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout)
    assert rec["check"]["tokens_identical"] is True
    assert rec["model_type"] == "deepseek_v2" and rec["num_experts"] == 64 and rec["top_k"] == 6
    assert rec["cache_slots"] == 112  # 25% of 7 MoE layers x 64
    assert rec["stats"]["misses"] > 0
    # the second run prefetches with a predictor trained on other prompts: same tokens, prefetches used
    pred = rec["predictive"]
    assert pred["tokens_identical"] is True and pred["stats"]["prefetch_hits"] > 0


def test_demo_reports_bad_model_dir(tmp_path, capsys):
    from moert import cli

    assert cli.main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_reports_a_missing_predictor_before_loading(tmp_path, capsys):
    from moert import cli

    assert cli.main(["demo", "--predictor", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tied_embeddings(tmp_path):
    """save_pretrained omits lm_head.weight when tied; load ties it back."""
    from moert.models.tiny import prompt_ids, save_tiny, tiny_model

    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    path = save_tiny(model, tmp_path / "tied")
    prompt = prompt_ids(2, 6)
    want = greedy(model, prompt, 8)
    loaded = moert.load(path, cache_experts=0.5, progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    got = greedy(loaded, prompt, 8)
    assert torch.equal(got[0], want[0])
