"""moert.load(host_budget=...): experts beyond the pinned pool, read from the checkpoint files.

DESIGN §8: a host budget below the experts changes no number: tokens equal the unpatched model's and
logits are bit-identical to the all-resident load, while device misses and SSD reads both happen.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import moert
from moert.api.tier import filesystem_of, parse_bytes, pool_capacity
from moert.models.tiny import Reference, greedy, random_predictor, single_thread

ARCHS = ("deepseek_v2-group", "qwen3_moe-norm", "phimoe")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tier")
    return {name: Reference(name, root, new_tokens=12) for name in ARCHS}


def run(path, prompt, tokens, **kwargs):
    model = moert.load(path, progress=False, **kwargs)
    handle = moert.handle_of(model)
    seq, logits = greedy(model, prompt, tokens)
    handle.offloader.engine.synchronize()  # no copy between its count and the pool's
    stats = handle.stats()
    report = {**handle.load_report, "slab_bytes": handle.layout.slab_bytes}
    handle.undo()
    return seq, logits, stats, report


@pytest.mark.parametrize("device", ["cpu", "sim"])
@pytest.mark.parametrize("name", ARCHS)
def test_exact_with_a_budget_below_the_experts(refs, name, device):
    ref = refs[name]
    kw = dict(cache_experts=0.25, device=device)
    full_seq, full_logits, full, _ = run(ref.path, ref.prompt, ref.new_tokens, **kw)
    seq, logits, st, rep = run(ref.path, ref.prompt, ref.new_tokens, host_budget=0.25, **kw)
    assert torch.equal(seq, ref.out[0]), "tokens differ from the unpatched model"
    assert torch.equal(logits, full_logits), "logits differ from the all-resident load"
    assert torch.equal(full_seq, seq)
    tier = rep["host_tier"]
    assert tier["tiered"] and tier["capacity"] < tier["all_experts"]
    assert st.misses > 0 and st.ssd_reads > 0 and st.pool_evictions > 0
    assert full.ssd_reads == 0 and full.pool_hits == 0  # no tier without a budget
    # every device load went through the host tier exactly once: from the pool or from the files
    slab = rep["slab_bytes"]
    assert st.pool_hits + st.ssd_reads == st.bytes_copied // slab
    assert st.ssd_bytes == st.ssd_reads * slab
    rows = st.per_layer.values()
    assert sum(r.ssd_reads for r in rows) == st.ssd_reads and sum(r.pool_hits for r in rows) == st.pool_hits
    assert 0 <= st.ssd_stall_s <= st.ssd_read_s


@pytest.mark.parametrize(("name", "device"), [(n, "cpu") for n in ARCHS] + [("qwen3_moe-norm", "sim")])
def test_read_ahead_is_exact_and_reads_ahead(refs, name, device):
    """A random lookahead-1 predictor's plans drive read-ahead (``read_ahead=1``): the same tokens as
    the unpatched model, logits bit-identical to the all-resident load with the same policy, misses
    at both tiers, and copies served by read-ahead slabs."""
    ref = refs[name]
    pred = random_predictor(ref.model, lookahead=1)
    kw = dict(cache_experts=0.25, device=device, policy="score", predictor=pred, overprovision=2)
    _, full_logits, _, _ = run(ref.path, ref.prompt, ref.new_tokens, **kw)
    seq, logits, st, rep = run(ref.path, ref.prompt, ref.new_tokens, host_budget=0.25, read_ahead=1, **kw)
    assert torch.equal(seq, ref.out[0]), "tokens differ from the unpatched model"
    assert torch.equal(logits, full_logits), "logits differ from the all-resident load"
    assert rep["host_tier"]["read_ahead"] == 1
    assert st.misses > 0 and st.ssd_reads > 0 and st.pool_evictions > 0
    assert st.read_ahead_reads > 0 and st.read_ahead_used > 0, st
    assert st.read_ahead_used + st.read_ahead_wasted <= st.read_ahead_reads
    # each device copy: from the pool (a read-ahead slab counts there) or read by its own lane
    assert st.pool_hits + st.ssd_reads - st.read_ahead_reads == st.bytes_copied // rep["slab_bytes"]
    assert sum(r.read_ahead_reads for r in st.per_layer.values()) == st.read_ahead_reads


def test_read_ahead_bad_values_are_clear_errors(refs):
    ref = refs["phimoe"]
    for bad in (-1, 65, 1.5, True, "1"):
        with pytest.raises(ValueError, match=f"read_ahead={bad!r} must be an int in 0..64"):
            moert.load(ref.path, host_budget=0.5, read_ahead=bad, progress=False)
    with pytest.raises(ValueError, match="read_ahead=1 needs host_budget="):
        moert.load(ref.path, read_ahead=1, progress=False)


@pytest.mark.parametrize("budget", [1.0, "1GiB"])
def test_a_budget_covering_every_expert_is_untiered(refs, budget):
    ref = refs["qwen3_moe-norm"]
    seq, logits, st, rep = run(ref.path, ref.prompt, 4, cache_experts=0.25, host_budget=budget)
    assert not rep["host_tier"]["tiered"] and st.ssd_reads == 0
    assert torch.equal(seq, ref.out[0][:, : seq.shape[1]])


@pytest.mark.parametrize("policy", ["lfu", "fifo"])
def test_lfu_fifo_pool_and_mmap_reads_are_exact(refs, policy):
    ref = refs["deepseek_v2-group"]
    seq, _, st, rep = run(
        ref.path,
        ref.prompt,
        ref.new_tokens,
        cache_experts=8,
        host_budget=0.3,
        pool_policy=policy,
        read_mode="mmap",
    )
    assert torch.equal(seq, ref.out[0]) and st.ssd_reads > 0 and st.pool_evictions > 0
    assert rep["host_tier"]["policy"] == policy and rep["host_tier"]["read_mode"] == "mmap"


def test_fused_checkpoint(refs, tmp_path):
    """A checkpoint with fused experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I] tensors."""
    ref = refs["qwen3_moe-norm"]
    dst = tmp_path / "fused"
    shutil.copytree(ref.path, dst)
    sd = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    (dst / "model.safetensors").unlink()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    seq, _, st, _ = run(dst, ref.prompt, ref.new_tokens, cache_experts=6, host_budget=0.25)
    assert torch.equal(seq, ref.out[0]) and st.ssd_reads > 0


def test_file_dtype_other_than_the_runtime_dtype_is_refused(refs):
    ref = refs["phimoe"]
    with pytest.raises(ValueError, match=r"is F32 but the model runs in bfloat16.*dtype='float32'"):
        moert.load(ref.path, dtype=torch.bfloat16, host_budget=0.5, progress=False)


def test_bad_budgets_are_clear_errors(refs):
    ref = refs["phimoe"]  # 3 MoE layers x 16 experts, top-2
    cases = [
        (-5, "must be positive bytes"),
        (0, "must be positive bytes"),
        (float("nan"), "not a fraction in \\(0, 1\\]"),
        (1.5, "not a fraction in \\(0, 1\\]"),
        ("lots", "is not a size"),
        ("12 parsecs", "is not a size"),
        (0.01, "gives 1 host slabs .* fewer than one layer's top-k \\(2\\); use at least"),
        ("1KiB", "gives 0 host slabs"),
        (True, "must be bytes"),
    ]
    for budget, match in cases:
        with pytest.raises(ValueError, match=match):
            moert.load(ref.path, host_budget=budget, progress=False)
    with pytest.raises(ValueError, match="pool_policy='mru'"):
        moert.load(ref.path, host_budget=0.5, pool_policy="mru", progress=False)
    with pytest.raises(ValueError, match="read_mode='aio'"):
        moert.load(ref.path, host_budget=0.5, read_mode="aio", progress=False)
    with pytest.raises(ValueError, match="cpu_experts=True is not supported"):
        moert.load(ref.path, host_budget=0.5, cpu_experts=True, progress=False)
    with pytest.raises(ValueError, match="backend='runtime'"):
        moert.load(ref.path, host_budget=0.5, backend="reference", progress=False)


def test_budget_arithmetic():
    assert (
        parse_bytes("16GiB") == 16 * 2**30
        and parse_bytes("1.5 GB") == 1_500_000_000
        and parse_bytes("4096") == 4096
    )
    assert pool_capacity("1KiB", total=100, stride=256, top_k=2) == 4
    assert pool_capacity(1000, total=100, stride=256, top_k=2) == 3  # rounded down
    assert pool_capacity(0.25, total=10, stride=256, top_k=2) == 3  # rounded up
    assert pool_capacity(10**12, total=100, stride=256, top_k=2) == 100  # capped
    with pytest.raises(ValueError, match="use at least 1024 bytes \\(4 slabs\\)"):
        pool_capacity(1000, total=100, stride=256, top_k=4)


def test_changed_file_after_load_is_a_clear_error(refs, tmp_path):
    ref = refs["qwen3_moe-norm"]
    dst = tmp_path / "m"
    shutil.copytree(ref.path, dst)
    model = moert.load(dst, cache_experts=0.25, host_budget=0.25, progress=False)
    shard = dst / "model.safetensors"
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # e.g. saved over
    with pytest.raises(RuntimeError, match=f"checkpoint file {shard} changed after loading"):
        greedy(model, ref.prompt, ref.new_tokens)
    moert.handle_of(model).discard()


def test_vanished_file_after_load_is_a_clear_error(refs, tmp_path):
    ref = refs["phimoe"]
    dst = tmp_path / "m"
    shutil.copytree(ref.path, dst)
    model = moert.load(dst, cache_experts=0.25, host_budget=0.25, progress=False)
    shard = dst / "model.safetensors"
    shard.unlink()
    with pytest.raises(RuntimeError, match=f"checkpoint file {shard} vanished after loading .*load again"):
        greedy(model, ref.prompt, ref.new_tokens)
    moert.handle_of(model).discard()


def test_info_says_read_only_and_network(refs, tmp_path, monkeypatch, capsys):
    """``moert info --model`` on a read-only and on a network mount (a mounts table naming the model's
    directory): host_budget works there, and it says so."""
    import moert.api.tier as tier
    from moert.cli import main as cli_main

    real = tier.filesystem_of
    path = os.path.realpath(refs["phimoe"].path)
    for fstype, opts, want in (
        ("ext4", "ro,relatime", "read-only: host_budget works"),
        ("nfs4", "rw,vers=4.2", "network filesystem: host_budget works, expert reads are slower"),
    ):
        mounts = tmp_path / f"mounts_{fstype}"
        mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nsrv:/m {path} {fstype} {opts} 0 0\n")
        monkeypatch.setattr(tier, "filesystem_of", lambda p, m=str(mounts): real(p, mounts=m))
        assert cli_main(["info", "--model", path]) == 0
        out = capsys.readouterr().out
        assert want in out, out


def test_read_only_files_work_and_filesystem_is_reported(refs, tmp_path):
    ref = refs["deepseek_v2-group"]
    dst = tmp_path / "ro"
    shutil.copytree(ref.path, dst)
    for f in dst.iterdir():
        f.chmod(0o444)
    dst.chmod(0o555)
    try:
        seq, _, st, rep = run(dst, ref.prompt, ref.new_tokens, cache_experts=0.25, host_budget=0.25)
    finally:
        dst.chmod(0o755)
    assert torch.equal(seq, ref.out[0]) and st.ssd_reads > 0
    assert rep["host_tier"]["filesystem"]["fstype"] is not None


def test_filesystem_of_reads_mount_options(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw,relatime 0 0\nsrv:/x /data nfs4 ro,vers=4.2 0 0\n")
    fs = filesystem_of("/data/models/q", mounts=str(mounts))
    assert fs == {"mount": "/data", "fstype": "nfs4", "read_only": True, "network": True}
    fs = filesystem_of("/home/me", mounts=str(mounts))
    assert fs["mount"] == "/" and fs["fstype"] == "ext4" and not fs["network"]


def test_loading_reads_no_expert_beyond_the_budget(refs, monkeypatch):
    """Loading fills at most ``capacity`` host slabs and never materialises the other experts (the
    patched model's state_dict hook would: it copies every expert out of the pool)."""
    from moert.engine.pool import ExpertPool

    calls = []
    real_copy_out, real_load = ExpertPool.copy_out, ExpertPool.load
    monkeypatch.setattr(
        ExpertPool, "copy_out", lambda self, *a: calls.append(("copy_out", a)) or real_copy_out(self, *a)
    )
    monkeypatch.setattr(ExpertPool, "load", lambda self, *a: calls.append(("load", a)) or real_load(self, *a))
    ref = refs["qwen3_moe-norm"]
    model = moert.load(ref.path, cache_experts=0.25, host_budget=0.25, progress=False)
    handle = moert.handle_of(model)
    capacity = handle.load_report["host_tier"]["capacity"]
    assert [c for c in calls if c[0] == "copy_out"] == []
    assert len(calls) == capacity
    assert sum(len(handle.offloader.pool.resident(o)) for o in range(len(handle.layer_ids))) == capacity
    # state_dict still gives every expert (copied out of the pool or the files)
    want = ref.model.state_dict()
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    handle.undo()
    assert torch.equal(greedy(model, ref.prompt, 4)[0], ref.out[0][:, : ref.prompt.shape[1] + 4])


def test_info_names_the_model_filesystem(refs, capsys):
    import json

    from moert.cli import main as cli_main

    ref = refs["phimoe"]
    assert cli_main(["info", "--model", str(ref.path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["model_storage"]
    assert st["path"] == os.path.realpath(ref.path) and st["fstype"] and "host_budget" in st["host_tier"]
