"""Capture routing traces from a live HF model while it generates (``moert trace --model ...``).

Forward hooks, one set per MoE layer (found by :func:`moert.models.get_adapter`), record without
changing anything (every hook returns None):
- the experts module, which transformers >= 5 calls as ``experts(hidden_states, top_k_index,
  top_k_weights)`` in deepseek_v2, qwen3_moe and phimoe: ``top_k_index`` (T, k) are the selected
  experts;
- the router (``mlp.gate`` / ``mlp.router``), whose output starts with the router logits (T, E):
  scores = softmax(logits) in fp32 (``--with-scores``);
- the decoder layer's ``input_layernorm``: its output is the normalized pre-attention row (T, H),
  stored fp16 (``--with-hidden``).
Prompts run one at a time (batch 1): the prefill forward records the prompt's tokens, each decode
step one token, so the rows concatenate into the sequence in order.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moert.trace.store import TraceWriter
from moert.trace.types import SequenceTrace, TraceMeta

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BUILTIN_PROMPTS", "RoutingRecorder", "capture", "capture_cli", "generate_and_record"]

BUILTIN_PROMPTS = (
    "Explain how a CPU cache decides which line to evict.",
    "Write a short poem about the sea at night.",
    "What is the capital of Australia, and why was it chosen?",
    "def fibonacci(n):",
    "Translate to French: The weather is nice today.",
    "List three uses of a mixture-of-experts language model.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How many prime numbers are there below 50?",
)


class RoutingRecorder:
    """Hooks that record the routing of every MoE layer of ``model``; a context manager.

    Args:
        model: an HF causal LM of a supported ``model_type``.
        with_scores: record router scores (T, E) fp32.
        with_hidden: record the normalized pre-attention rows (T, H) fp16.
    """

    def __init__(self, model: nn.Module, *, with_scores: bool = False, with_hidden: bool = False) -> None:
        from moert.models import get_adapter

        self.adapter = get_adapter(model)
        self.refs = self.adapter.moe_layers()
        if not self.refs:
            raise ValueError(f"{type(model).__name__} has no MoE layers to record")
        self.with_scores, self.with_hidden = with_scores, with_hidden
        self._handles: list = []
        self.reset()

    def meta(self, source: str) -> TraceMeta:
        """The trace metadata (without counts) of what this recorder captures."""
        return TraceMeta(
            model_type=self.adapter.model_type,
            layers=tuple(ref.index for ref in self.refs),
            num_experts=self.adapter.num_experts,
            top_k=self.adapter.top_k,
            hidden_size=self.adapter.hidden_size if self.with_hidden else None,
            has_scores=self.with_scores,
            has_hidden=self.with_hidden,
            source=source,
        )

    def reset(self) -> None:
        """Forgets what was recorded."""
        n = len(self.refs)
        self._experts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._scores: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._hidden: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def __enter__(self) -> RoutingRecorder:
        for i, ref in enumerate(self.refs):
            self._handles.append(ref.experts.register_forward_hook(self._experts_hook(i), with_kwargs=True))
            if self.with_scores:
                self._handles.append(ref.router.register_forward_hook(self._router_hook(i)))
            if self.with_hidden:
                self._handles.append(ref.norm.register_forward_hook(self._norm_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _experts_hook(self, i: int):
        def hook(module, args, kwargs, output) -> None:
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if index is None:
                raise RuntimeError(
                    f"layer {self.refs[i].index}: the experts module was called without top_k_index; "
                    "moert capture needs transformers >= 5 (experts(hidden_states, top_k_index, top_k_weights))"
                )
            self._experts[i].append(index.detach().reshape(-1, index.shape[-1]).to("cpu", torch.int64))

        return hook

    def _router_hook(self, i: int):
        def hook(module, args, output) -> None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            E = self.adapter.num_experts
            self._scores[i].append(logits.detach().reshape(-1, E).float().softmax(-1).cpu())

        return hook

    def _norm_hook(self, i: int):
        def hook(module, args, output) -> None:
            rows = output[0] if isinstance(output, (tuple, list)) else output
            self._hidden[i].append(rows.detach().reshape(-1, rows.shape[-1]).to("cpu", torch.float16))

        return hook

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What was recorded since the last reset, then resets.

        Returns:
            experts (L, T, k) int64, scores (L, T, E) fp32 or None, hidden (L, T, H) fp16 or None.
        """

        def stack(parts: list[list[torch.Tensor]], what: str) -> torch.Tensor:
            per_layer = [torch.cat(p) if p else torch.zeros(0) for p in parts]
            lengths = {t.shape[0] for t in per_layer}
            if len(lengths) != 1:
                raise RuntimeError(f"MoE layers recorded different token counts of {what}: {sorted(lengths)}")
            return torch.stack(per_layer)

        experts = stack(self._experts, "experts")
        scores = stack(self._scores, "scores") if self.with_scores else None
        hidden = stack(self._hidden, "hidden rows") if self.with_hidden else None
        self.reset()
        return experts, scores, hidden


@torch.no_grad()
def generate_and_record(
    model: nn.Module, recorder: RoutingRecorder, input_ids: torch.Tensor, max_new_tokens: int, seq_id: int
) -> SequenceTrace:
    """Greedy-generates from one prompt with the recorder installed; returns its routing.

    Args:
        model: the causal LM (the recorder's).
        recorder: an entered :class:`RoutingRecorder`.
        input_ids: (1, P) or (P,) prompt ids.
        max_new_tokens: tokens to generate; 0 runs the prompt once (prefill only).
        seq_id: the sequence id to record.
    """
    ids = input_ids.reshape(1, -1).to(model.device)
    P = ids.shape[1]
    recorder.reset()
    if max_new_tokens > 0:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
        fed = out[0, :-1].cpu()  # the last generated token never went through the model
    else:
        model(ids, attention_mask=torch.ones_like(ids))
        fed = ids[0].cpu()
    experts, scores, hidden = recorder.take()
    T = fed.shape[0]
    if experts.shape[1] != T:
        raise RuntimeError(
            f"recorded {experts.shape[1]} tokens of routing but {T} tokens went through the model"
        )
    return SequenceTrace(
        seq_id=seq_id,
        positions=torch.arange(T),
        experts=experts,
        is_prefill=torch.arange(T) < P,
        token_ids=fed.long(),
        scores=scores,
        hidden=hidden,
    )


def capture(
    model: nn.Module,
    prompts: Iterable[torch.Tensor],
    out_dir: str | Path,
    *,
    max_new_tokens: int = 32,
    with_scores: bool = False,
    with_hidden: bool = False,
    source: str = "",
    overwrite: bool = False,
    progress: bool = False,
) -> TraceMeta:
    """Generates from each prompt (token ids) and writes the routing trace to ``out_dir``.

    Returns:
        The written trace's meta.
    """
    prompts = list(prompts)
    recorder = RoutingRecorder(model, with_scores=with_scores, with_hidden=with_hidden)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), unit="prompt", desc="moert trace", file=sys.stderr)
    with recorder, TraceWriter(out_dir, recorder.meta(source), overwrite=overwrite) as writer:
        for i, ids in enumerate(prompts):
            writer.add(generate_and_record(model, recorder, ids, max_new_tokens, seq_id=i))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return writer.meta


def capture_cli(args: argparse.Namespace) -> int:
    """``moert trace --model PATH ...`` (see :mod:`moert.cli.trace`)."""
    from transformers import AutoTokenizer

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    if args.random_prompts is not None:
        return _capture_random(args)
    if args.builtin:
        texts = list(BUILTIN_PROMPTS)
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"--prompts {path}: no non-empty lines")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {args.model}: no usable tokenizer there ({exc})") from None
    prompts = [tokenizer(text, return_tensors="pt")["input_ids"][0] for text in texts]
    return _capture_and_report(args, _load_model(args), prompts)


def _load_model(args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()


def _capture_random(args: argparse.Namespace) -> int:
    """``--random-prompts N``: seeded random token ids, for models that ship no tokenizer."""
    if args.random_prompts < 1 or args.prompt_len < 1:
        raise ValueError(
            f"--random-prompts {args.random_prompts} --prompt-len {args.prompt_len}: both must be >= 1"
        )
    model = _load_model(args)
    g = torch.Generator().manual_seed(args.seed)
    vocab = int(model.config.vocab_size)
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g) for _ in range(args.random_prompts)]
    return _capture_and_report(args, model, prompts)


def _capture_and_report(args: argparse.Namespace, model: nn.Module, prompts: list[torch.Tensor]) -> int:
    meta = capture(
        model,
        prompts,
        args.out,
        max_new_tokens=args.max_new_tokens,
        with_scores=args.with_scores,
        with_hidden=args.with_hidden,
        source=f"moert trace --model {args.model}",
        overwrite=args.overwrite,
        progress=True,
    )
    print(
        f"wrote {args.out}: {meta.num_sequences} sequences, {meta.num_tokens} tokens, "
        f"L={meta.num_layers}, E={meta.num_experts}, k={meta.top_k}"
    )
    return 0
