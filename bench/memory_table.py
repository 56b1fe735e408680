"""Memory table for the three supported models: routed expert bytes, non-expert weights, and which
(GPU, host RAM) pairs each fits, all experts pinned in host memory or with the SSD tier.

Computed from each model's config dimensions (bf16, 2 bytes per parameter); the sources of every
dimension are in ``CONFIGS`` (``source``) and in the Markdown output. Checked against DESIGN.md §1
(28.8 GB, 58 GB, ~24 MB per Phi expert) and the model cards' parameter totals.

Budget rules (assumptions, printed with the table):
- GPU: non-expert weights (attention, dense/shared MLPs, norms, routers, embeddings and lm_head)
  + KV cache for ``CONTEXT`` tokens at batch 1 (HF transformers' cache layout) + ``GPU_MARGIN``
  (CUDA context, activations, workspace); what is left is the slab cache, in whole experts; the model
  runs only if that is at least one layer's top-k.
- Host: the pinned pool + ``HOST_MARGIN`` (OS, Python, torch). All-in-host needs every routed expert
  in the pool; with the SSD tier the pool is what fits (fraction F of all experts, as
  ``moert simulate --host-capacity F``), the rest read from the checkpoint files on SSD.

    python bench/memory_table.py     # -> bench/results/memory_table.{json,md}  (make memory-table)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GB = 1e9
CONTEXT = 4096
GPU_MARGIN = 1.5 * GB
HOST_MARGIN = 4.0 * GB
GPUS = (8, 16, 24)
HOSTS = (16, 32, 64)

CONFIGS = {
    "DeepSeek-V2-Lite": {
        "hidden": 2048, "layers": 27, "dense_layers": 1, "dense_ff": 10944, "experts": 64, "top_k": 6,
        "expert_ff": 1408, "shared_experts": 2, "vocab": 102400, "tied": False, "heads": 16,
        "attention": "mla", "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope": 128, "qk_rope": 64, "v_head": 128,
        "card_total_b": 16,
        "source": "config.json of deepseek-ai/DeepSeek-V2-Lite(-Chat) as copied in huggingface.co/nicoboss/"
                  "DeepSeek-V2-Lite-Chat-Uncensored (hidden 2048, 27 layers, first_k_dense_replace 1, intermediate "
                  "10944, moe_intermediate 1408, 64 routed + 2 shared, top-6, 16 heads, kv_lora_rank 512, qk_nope 128, "
                  "qk_rope 64, q_lora_rank null) and deepseek-ai/DeepSeek-V3 inference/configs/config_16B.json "
                  "(vocab 102400, v_head_dim 128); card: 16B total, 2.4B active",
    },
    "Qwen3-30B-A3B": {
        "hidden": 2048, "layers": 48, "dense_layers": 0, "dense_ff": 0, "experts": 128, "top_k": 8,
        "expert_ff": 768, "shared_experts": 0, "vocab": 151936, "tied": False, "heads": 32, "kv_heads": 4,
        "head_dim": 128, "attention": "gqa", "card_total_b": 30.5,
        "source": "Qwen/Qwen3-30B-A3B model card (48 layers, 32 Q / 4 KV heads, 128 experts, 8 active, 30.5B total); "
                  "hidden 2048, moe_intermediate 768, head_dim 128, vocab 151936, untied embeddings from the Qwen3-30B-A3B "
                  "model configs in Ascend/MindSpeed-RL configs/model/qwen3_30b_a3b.yaml and slime "
                  "scripts/models/qwen3-30B-A3B.sh (the hub config.json itself is not in the search index)",
    },
    "Phi-mini-MoE": {
        "hidden": 4096, "layers": 32, "dense_layers": 0, "dense_ff": 0, "experts": 16, "top_k": 2,
        "expert_ff": 960, "shared_experts": 0, "vocab": 32064, "tied": False, "heads": 32, "kv_heads": 8,
        "head_dim": 128, "attention": "gqa", "card_total_b": 7.6,
        "source": "microsoft/Phi-mini-MoE-instruct card (7.6B total / 2.4B active; SlimMoE, slimmed from Phi-3.5-MoE: "
                  "hidden 4096, 32 layers, 32 Q / 8 KV heads, 16 experts top-2, vocab 32064, untied, per Phi-3.5-MoE-instruct's "
                  "config.json as listed in the davidsajare/david-share Phi-3.5-MoE write-up). "
                  "The hub config.json of Phi-mini-MoE is not in the search index: expert width 960 is DERIVED from the "
                  "card's 7.6B / 2.4B totals with the attention unslimmed (it gives 7.65B / 2.36B; DESIGN.md: ~24 MB "
                  "per expert); check it against the real config.json before relying on the last digit",
    },
}  # fmt: skip


def attention_params(c: dict) -> int:
    """Parameters of one layer's attention projections (no norms or biases)."""
    H = c["hidden"]
    if c["attention"] == "mla":
        qk = c["qk_nope"] + c["qk_rope"]
        q = H * c["heads"] * qk
        kv_a = H * (c["kv_lora_rank"] + c["qk_rope"])
        kv_b = c["kv_lora_rank"] * c["heads"] * (c["qk_nope"] + c["v_head"])
        return q + kv_a + kv_b + c["heads"] * c["v_head"] * H
    d = c["head_dim"]
    return H * c["heads"] * d * 2 + H * c["kv_heads"] * d * 2


def kv_bytes_per_token(c: dict) -> int:
    """HF transformers' cache at bf16: per layer, K and V of every KV head (MLA: the decompressed
    per-head K of qk_nope+qk_rope and V of v_head; not the 576-wide latent)."""
    if c["attention"] == "mla":
        per_layer = c["heads"] * (c["qk_nope"] + c["qk_rope"] + c["v_head"])
    else:
        per_layer = 2 * c["kv_heads"] * c["head_dim"]
    return per_layer * c["layers"] * 2


def model_row(name: str, c: dict) -> dict:
    H, moe_layers = c["hidden"], c["layers"] - c["dense_layers"]
    expert = 3 * H * c["expert_ff"]
    routed = moe_layers * c["experts"] * expert
    non_expert = (
        c["layers"] * (attention_params(c) + 2 * H)  # attention + two norms
        + c["dense_layers"] * 3 * H * c["dense_ff"]
        + moe_layers * (c["shared_experts"] * expert + c["experts"] * H)  # shared experts + router
        + c["vocab"] * H * (1 if c["tied"] else 2)
        + H
    )
    active = non_expert + moe_layers * c["top_k"] * expert
    return {
        "model": name,
        "moe_layers": moe_layers,
        "experts_per_layer": c["experts"],
        "top_k": c["top_k"],
        "expert_bytes": 2 * expert,
        "routed_bytes": 2 * routed,
        "non_expert_bytes": 2 * non_expert,
        "total_params_b": (routed + non_expert) / 1e9,
        "active_params_b": active / 1e9,
        "card_total_b": c["card_total_b"],
        "kv_bytes_per_token": kv_bytes_per_token(c),
        "source": c["source"],
    }


def fit(row: dict, gpu_gb: int, host_gb: int) -> dict:
    """Slab cache and pool for one (GPU, host) pair (module doc's rules)."""
    kv = row["kv_bytes_per_token"] * CONTEXT
    slab = gpu_gb * GB - row["non_expert_bytes"] - kv - GPU_MARGIN
    slab_experts = max(0, int(slab // row["expert_bytes"]))
    total_experts = row["moe_layers"] * row["experts_per_layer"]
    runs = slab_experts >= row["top_k"]
    pool = max(0.0, host_gb * GB - HOST_MARGIN)
    pool_experts = min(total_experts, int(pool // row["expert_bytes"]))
    return {
        "gpu_gb": gpu_gb,
        "host_gb": host_gb,
        "kv_cache_bytes": kv,
        "slab_cache_bytes": slab_experts * row["expert_bytes"],
        "slab_cache_experts": slab_experts,
        "slab_cache_fraction": min(1.0, slab_experts / total_experts),
        "gpu_fits": runs,
        "all_in_host": runs and pool >= row["routed_bytes"],
        "ssd_tier_fits": runs and pool_experts >= row["top_k"],
        "pool_experts": pool_experts,
        "host_capacity": pool_experts / total_experts,
    }


def markdown(res: dict) -> str:
    a = res["assumptions"]
    lines = [
        "# Memory: routed experts, non-expert weights, and which GPU / host sizes each model fits",
        "",
        f"{res['environment']['date']}, commit {res['environment']['commit']}. `python bench/memory_table.py` "
        "(`make memory-table`); bf16 weights, from each model's config dimensions (sources below).",
        "",
        "| model | expert | routed experts | non-expert weights | params (card) | KV cache / token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in res["models"]:
        lines.append(
            f"| {m['model']} ({m['moe_layers']} x {m['experts_per_layer']}, top-{m['top_k']}) | "
            f"{m['expert_bytes'] / 1e6:.1f} MB | {m['routed_bytes'] / GB:.1f} GB | {m['non_expert_bytes'] / GB:.2f} GB | "
            f"{m['total_params_b']:.2f}B ({m['card_total_b']}B) | {m['kv_bytes_per_token'] / 1e3:.0f} KB |"
        )
    lines += [
        "",
        f"Per (GPU, host RAM): the slab cache is what the GPU holds after the non-expert weights, a KV cache of "
        f"{a['context_tokens']} tokens and {a['gpu_margin_gb']:g} GB for the CUDA context and activations (in experts, "
        f"and as a fraction of all experts); the pool is host RAM minus {a['host_margin_gb']:g} GB. Cell: "
        "**all in host** (every expert pinned), **SSD F=x** (the pool holds a fraction x; the rest read from SSD: "
        "`moert simulate --host-capacity x` predicts the speed), or **no** (the GPU cannot hold the non-expert "
        "weights, the KV cache and one layer's top-k).",
        "",
    ]
    for m in res["models"]:
        rows = [r for r in res["fits"] if r["model"] == m["model"]]
        lines += [
            f"**{m['model']}**",
            "",
            "| GPU | slab cache | " + " | ".join(f"host {h} GB" for h in HOSTS) + " |",
        ]
        lines.append("|---|---:|" + "---:|" * len(HOSTS))
        for g in GPUS:
            by = {r["host_gb"]: r for r in rows if r["gpu_gb"] == g}
            r0 = by[HOSTS[0]]
            slab = (
                f"{r0['slab_cache_bytes'] / GB:.1f} GB = {r0['slab_cache_experts']} experts ({100 * r0['slab_cache_fraction']:.0f}%)"
                if r0["gpu_fits"]
                else "-"
            )
            cells = [_cell(by[h]) for h in HOSTS]
            lines.append(f"| {g} GB | {slab} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Sources:", ""] + [f"- {m['model']}: {m['source']}." for m in res["models"]]
    return "\n".join(lines) + "\n"


def _cell(r: dict) -> str:
    if not r["gpu_fits"]:
        return "no"
    if r["all_in_host"]:
        return "all in host"
    return f"SSD F={r['host_capacity']:.2f}" if r["ssd_tier_fits"] else "no"


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from moert.cli.simulate import environment

    models = [model_row(n, c) for n, c in CONFIGS.items()]
    fits = [{"model": m["model"], **fit(m, g, h)} for m in models for g in GPUS for h in HOSTS]
    res = {
        "environment": environment(),
        "assumptions": {"dtype": "bf16", "context_tokens": CONTEXT, "gpu_margin_gb": GPU_MARGIN / GB,
                        "host_margin_gb": HOST_MARGIN / GB, "gpus_gb": list(GPUS), "hosts_gb": list(HOSTS)},
        "models": models,
        "fits": fits,
    }  # fmt: skip
    (RESULTS / "memory_table.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "memory_table.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
