"""The moert trace format: safetensors shards + a JSON manifest; streaming reader and writer.

A trace records, per MoE layer and token, which experts the router selected, plus optionally the
router scores and the normalized pre-attention row. Layout on disk::

    DIR/manifest.json            model_type, layer ids, E, k, H, dtypes, source, counts, shard list
    DIR/shard_00000.safetensors  whole sequences, concatenated along the token axis (T_s tokens):
        seq_ids      (S,)        int64   sequence ids
        seq_offsets  (S+1,)      int64   token offsets of each sequence inside the shard
        positions    (T_s,)      int64
        is_prefill   (T_s,)      bool
        experts      (L, T_s, k) int16 (int32 when E > 32767), layer-major
        token_ids    (T_s,)      int64   optional
        token_bytes  (nbytes,)   uint8   optional, UTF-8 token strings, concatenated
        token_offsets (T_s+1,)   int64   optional, byte offsets into token_bytes
        scores       (L, T_s, E) fp32    optional router scores
        hidden       (L, T_s, H) fp16    optional normalized pre-attention rows

Reading streams one shard at a time, so a trace larger than memory replays; every shard is
validated as it is read, with errors naming the file and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from moert.trace.types import MANIFEST, SequenceTrace, Trace, TraceFormatError, TraceMeta, check_expert_ids

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MoertTrace", "TraceWriter"]

FORMAT_NAME = "moert-trace"
FORMAT_VERSION = 1
_SHARD_TOKENS = 1 << 16


class MoertTrace(Trace):
    """A trace in the moert format (a directory with ``manifest.json``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise TraceFormatError(f"{manifest_path}: not found; is {self.path} a moert trace directory?")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceFormatError(f"{manifest_path}: not valid JSON: {exc}") from None
        self._manifest = manifest
        self._meta, self._shards = _parse_manifest(manifest, manifest_path)

    @property
    def meta(self) -> TraceMeta:
        return self._meta

    @property
    def manifest(self) -> dict:
        return dict(self._manifest)

    def sequences(self) -> Iterator[SequenceTrace]:
        seen_tokens = seen_seqs = 0
        for shard in self._shards:
            for seq in _read_shard(self.path / shard["file"], self._meta, shard):
                seen_tokens += seq.num_tokens
                seen_seqs += 1
                yield seq
        if (seen_tokens, seen_seqs) != (self._meta.num_tokens, self._meta.num_sequences):
            raise TraceFormatError(
                f"{self.path / MANIFEST}: fields 'num_tokens'/'num_sequences' say "
                f"{self._meta.num_tokens}/{self._meta.num_sequences}, the shards hold {seen_tokens}/{seen_seqs}"
            )


def _parse_manifest(manifest: object, where: Path) -> tuple[TraceMeta, list[dict]]:
    if not isinstance(manifest, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise TraceFormatError(
            f"{where}: field 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise TraceFormatError(
            f"{where}: field 'version' is {manifest.get('version')!r}; this moert reads version {FORMAT_VERSION}"
        )
    types = {
        "model_type": str,
        "layers": list,
        "num_experts": int,
        "top_k": int,
        "num_tokens": int,
        "num_sequences": int,
        "has_scores": bool,
        "has_hidden": bool,
        "source": str,
        "shards": list,
    }
    for key, typ in types.items():
        if not isinstance(manifest.get(key), typ):
            raise TraceFormatError(
                f"{where}: field '{key}' must be a {typ.__name__}, got {manifest.get(key)!r:.80}"
            )
    hidden_size = manifest.get("hidden_size")
    if hidden_size is not None and not isinstance(hidden_size, int):
        raise TraceFormatError(f"{where}: field 'hidden_size' must be an int or null, got {hidden_size!r}")
    try:
        meta = TraceMeta(
            model_type=manifest["model_type"],
            layers=tuple(manifest["layers"]),
            num_experts=manifest["num_experts"],
            top_k=manifest["top_k"],
            hidden_size=hidden_size,
            num_tokens=manifest["num_tokens"],
            num_sequences=manifest["num_sequences"],
            has_scores=manifest["has_scores"],
            has_hidden=manifest["has_hidden"],
            source=manifest["source"],
        )
    except (ValueError, TypeError) as exc:
        raise TraceFormatError(f"{where}: {exc}") from None
    shards = manifest["shards"]
    for i, shard in enumerate(shards):
        ok = isinstance(shard, dict) and isinstance(shard.get("file"), str)
        ok = ok and all(isinstance(shard.get(key), int) for key in ("num_tokens", "num_sequences"))
        if not ok or "/" in shard["file"] or shard["file"].startswith("."):
            raise TraceFormatError(
                f"{where}: field 'shards[{i}]' must be {{file: name in the trace dir, num_tokens, num_sequences}}, "
                f"got {shard!r:.120}"
            )
    return meta, shards


def _read_shard(path: Path, meta: TraceMeta, shard: dict) -> Iterator[SequenceTrace]:
    """The sequences of one shard, in order; raises TraceFormatError (at the first ``next``) naming
    the file and field when the shard is unreadable or disagrees with ``meta`` or its manifest entry."""
    fields = _load_fields(path, meta)
    _check_fields(path, meta, shard, fields)
    yield from _sequences(path, fields)


def _load_fields(path: Path, meta: TraceMeta) -> dict[str, torch.Tensor | None]:
    """The shard's tensors by field name, each of the right dtype and rank; None for an optional
    field the shard lacks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise TraceFormatError(f"{path}: shard listed in the manifest is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise TraceFormatError(f"{path}: not a readable safetensors file: {exc}") from None

    def field(
        name: str, dtypes: tuple[torch.dtype, ...], dims: int, required: bool = True
    ) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            if required:
                raise TraceFormatError(f"{path}: field '{name}' is missing")
            return None
        if t.dtype not in dtypes or t.dim() != dims:
            raise TraceFormatError(
                f"{path}: field '{name}' must be a {dims}-d {'/'.join(str(d) for d in dtypes)} tensor, "
                f"got {t.dim()}-d {t.dtype}"
            )
        return t

    i64 = (torch.int64,)
    return {
        "seq_ids": field("seq_ids", i64, 1),
        "seq_offsets": field("seq_offsets", i64, 1),
        "positions": field("positions", i64, 1),
        "is_prefill": field("is_prefill", (torch.bool,), 1),
        "experts": field("experts", (torch.int16, torch.int32, torch.int64), 3),
        "token_ids": field("token_ids", i64, 1, required=False),
        "token_bytes": field("token_bytes", (torch.uint8,), 1, required=False),
        "token_offsets": field("token_offsets", i64, 1, required=False),
        "scores": field("scores", (torch.float32,), 3, required=meta.has_scores),
        "hidden": field("hidden", (torch.float16,), 3, required=meta.has_hidden),
    }


def _check_fields(path: Path, meta: TraceMeta, shard: dict, fields: dict[str, torch.Tensor | None]) -> None:
    """Raises TraceFormatError unless the fields' counts match the manifest entry ``shard``, the
    offsets are consistent, the shapes match ``meta`` and the expert ids and scores are valid."""
    offsets, token_bytes, token_offsets = (
        fields["seq_offsets"],
        fields["token_bytes"],
        fields["token_offsets"],
    )
    T, S = int(fields["positions"].shape[0]), int(fields["seq_ids"].shape[0])
    if (shard["num_tokens"], shard["num_sequences"]) != (T, S):
        raise TraceFormatError(
            f"{path}: holds {T} tokens / {S} sequences, the manifest says "
            f"{shard['num_tokens']} / {shard['num_sequences']}"
        )
    if offsets.shape[0] != S + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != T:
        raise TraceFormatError(f"{path}: field 'seq_offsets' must run from 0 to {T} with {S + 1} entries")
    if S and bool((offsets[1:] <= offsets[:-1]).any()):
        raise TraceFormatError(
            f"{path}: field 'seq_offsets' must be strictly increasing (no empty sequences)"
        )
    if (token_bytes is None) != (token_offsets is None):
        raise TraceFormatError(f"{path}: fields 'token_bytes' and 'token_offsets' come together")
    if token_offsets is not None and (
        token_offsets.shape[0] != T + 1 or int(token_offsets[-1]) != token_bytes.shape[0]
    ):
        raise TraceFormatError(
            f"{path}: field 'token_offsets' must have {T + 1} entries ending at len(token_bytes)"
        )
    expected = {
        "is_prefill": (T,),
        "experts": (meta.num_layers, T, meta.top_k),
        "token_ids": (T,),
        "scores": (meta.num_layers, T, meta.num_experts),
        "hidden": (meta.num_layers, T, meta.hidden_size),
    }
    for name, shape in expected.items():
        t = fields[name]
        if t is not None and tuple(t.shape) != shape:
            raise TraceFormatError(f"{path}: field '{name}' has shape {tuple(t.shape)}, expected {shape}")
    check_expert_ids(
        fields["experts"], meta.num_experts, lambda msg: TraceFormatError(f"{path}: field 'experts': {msg}")
    )
    scores = fields["scores"]
    if scores is not None and not bool(torch.isfinite(scores).all()):
        raise TraceFormatError(f"{path}: field 'scores' contains NaN or inf")


def _sequences(path: Path, fields: dict[str, torch.Tensor | None]) -> Iterator[SequenceTrace]:
    """The checked fields cut into one SequenceTrace per sequence (copies, not views of the shard)."""
    seq_ids, offsets, token_offsets = fields["seq_ids"], fields["seq_offsets"], fields["token_offsets"]
    positions, is_prefill, token_ids = fields["positions"], fields["is_prefill"], fields["token_ids"]
    scores, hidden = fields["scores"], fields["hidden"]
    experts = fields["experts"].long()
    raw = bytes(fields["token_bytes"].numpy()) if fields["token_bytes"] is not None else None
    for s in range(int(seq_ids.shape[0])):
        a, b = int(offsets[s]), int(offsets[s + 1])
        tokens = None
        if raw is not None:
            offs = token_offsets[a : b + 1].tolist()
            try:
                tokens = [raw[offs[j] : offs[j + 1]].decode("utf-8") for j in range(b - a)]
            except UnicodeDecodeError as exc:
                raise TraceFormatError(f"{path}: field 'token_bytes': not UTF-8: {exc}") from None
        yield SequenceTrace(
            seq_id=int(seq_ids[s]),
            positions=positions[a:b].clone(),
            experts=experts[:, a:b].contiguous(),
            is_prefill=is_prefill[a:b].clone(),
            token_ids=token_ids[a:b].clone() if token_ids is not None else None,
            tokens=tokens,
            scores=scores[:, a:b].contiguous() if scores is not None else None,
            hidden=hidden[:, a:b].contiguous() if hidden is not None else None,
        )


class TraceWriter:
    """Writes sequences to a moert trace directory, one safetensors shard per ~``shard_tokens`` tokens.

    Example::

        with TraceWriter(out, model_type="qwen3_moe", layers=range(4), num_experts=16, top_k=2) as w:
            w.add(seq)

    Args:
        out_dir: the trace directory (created).
        meta: a TraceMeta whose counts are ignored (alternative to the keyword fields).
        model_type, layers, num_experts, top_k, hidden_size, has_scores, has_hidden, source: see TraceMeta.
        shard_tokens: tokens per shard before a new one starts (a sequence is never split).
        overwrite: replace an existing trace in ``out_dir``; otherwise that is an error.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        meta: TraceMeta | None = None,
        *,
        model_type: str | None = None,
        layers=None,
        num_experts: int | None = None,
        top_k: int | None = None,
        hidden_size: int | None = None,
        has_scores: bool = False,
        has_hidden: bool = False,
        source: str = "",
        shard_tokens: int = _SHARD_TOKENS,
        overwrite: bool = False,
    ) -> None:
        if meta is None:
            if model_type is None or layers is None or num_experts is None or top_k is None:
                raise ValueError(
                    "TraceWriter needs meta=TraceMeta(...) or model_type, layers, num_experts, top_k"
                )
            meta = TraceMeta(
                model_type=model_type,
                layers=tuple(layers),
                num_experts=num_experts,
                top_k=top_k,
                hidden_size=hidden_size,
                has_scores=has_scores,
                has_hidden=has_hidden,
                source=source,
            )
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
        self.meta = dataclasses.replace(meta, num_tokens=0, num_sequences=0)
        self.out_dir = Path(out_dir)
        if (self.out_dir / MANIFEST).exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} already holds a trace; pass overwrite=True (--overwrite)"
                )
            for old in self.out_dir.glob("shard_*.safetensors"):
                old.unlink()
            (self.out_dir / MANIFEST).unlink()
        self._created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shard_tokens = shard_tokens
        self._pending: list[SequenceTrace] = []
        self._pending_tokens = 0
        self._shards: list[dict] = []
        self._num_tokens = self._num_sequences = 0
        self._has_token_ids: bool | None = None
        self._has_tokens: bool | None = None
        self._closed = False

    def add(self, seq: SequenceTrace) -> None:
        """Appends one sequence (validated against the writer's meta)."""
        if self._closed:
            raise ValueError("TraceWriter is closed")
        seq.validate(self.meta, where=f"TraceWriter({self.out_dir})")
        if seq.num_tokens == 0:
            raise ValueError(f"sequence {seq.seq_id} has no tokens")
        for attr, name in (("_has_token_ids", "token_ids"), ("_has_tokens", "tokens")):
            has = getattr(seq, name) is not None
            if getattr(self, attr) is None:
                setattr(self, attr, has)
            elif getattr(self, attr) != has:
                raise ValueError(
                    f"sequence {seq.seq_id}: '{name}' is {'set' if has else 'None'} but was "
                    f"{'None' if has else 'set'} for earlier sequences; every sequence must agree"
                )
        self._pending.append(seq)
        self._pending_tokens += seq.num_tokens
        if self._pending_tokens >= self._shard_tokens:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        seqs = self._pending
        lengths = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int64)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        expert_dtype = torch.int16 if self.meta.num_experts <= 32767 else torch.int32
        tensors = {
            "seq_ids": torch.tensor([s.seq_id for s in seqs], dtype=torch.int64),
            "seq_offsets": offsets,
            "positions": torch.cat([s.positions.long() for s in seqs]),
            "is_prefill": torch.cat([s.is_prefill for s in seqs]),
            "experts": torch.cat(
                [s.experts.to(expert_dtype) for s in seqs], dim=1
            ).contiguous(),  # [L, T_s, k]
        }
        if self._has_token_ids:
            tensors["token_ids"] = torch.cat([s.token_ids.long() for s in seqs])
        if self._has_tokens:
            encoded = [tok.encode("utf-8") for s in seqs for tok in s.tokens]
            tok_offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
            tok_offsets[1:] = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0)
            tensors["token_bytes"] = torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())
            tensors["token_offsets"] = tok_offsets
        if self.meta.has_scores:
            tensors["scores"] = torch.cat([s.scores.float() for s in seqs], dim=1).contiguous()
        if self.meta.has_hidden:
            tensors["hidden"] = torch.cat([s.hidden.half() for s in seqs], dim=1).contiguous()
        name = f"shard_{len(self._shards):05d}.safetensors"
        _write_atomically(self.out_dir / name, lambda tmp: save_file(tensors, str(tmp)), "trace shard")
        T = int(offsets[-1])
        self._shards.append({"file": name, "num_tokens": T, "num_sequences": len(seqs)})
        self._num_tokens += T
        self._num_sequences += len(seqs)
        self._pending, self._pending_tokens = [], 0

    def close(self) -> TraceMeta:
        """Flushes the last shard and writes the manifest; returns the final meta (with counts)."""
        if self._closed:
            return self.meta
        self._flush()
        self.meta = dataclasses.replace(
            self.meta, num_tokens=self._num_tokens, num_sequences=self._num_sequences
        )
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **{f.name: getattr(self.meta, f.name) for f in dataclasses.fields(self.meta)},
            "layers": list(self.meta.layers),
            "expert_dtype": "int16" if self.meta.num_experts <= 32767 else "int32",
            "scores_dtype": "float32" if self.meta.has_scores else None,
            "hidden_dtype": "float16" if self.meta.has_hidden else None,
            "has_token_ids": bool(self._has_token_ids),
            "has_tokens": bool(self._has_tokens),
            "shards": self._shards,
        }
        text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
        _write_atomically(self.out_dir / MANIFEST, lambda tmp: tmp.write_text(text), "trace manifest")
        self._closed = True
        return self.meta

    def abort(self) -> None:
        """Removes what this writer wrote (its shards; the folder when it made it and it is empty): a
        trace that failed half-way leaves nothing behind that looks like a trace."""
        for shard in self._shards:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)
        self._shards, self._pending, self._closed = [], [], True
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_atomically(path: Path, write: Callable[[Path], object], what: str) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then renames it to ``path``: a failure (a
    full disk) leaves no partial file and raises OSError naming ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(
            exc.errno,
            f"writing the {what} {path} failed ({exc.strerror or exc}); free disk space or "
            "choose another --out",
        ) from exc
