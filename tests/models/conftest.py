"""Session-scoped tiny models (one per routing variant), their saved directories and reference outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from moert.testing import VARIANTS, prompt_ids, save_tiny, tiny_model

NEW_TOKENS = 32


class Reference:
    """An unpatched tiny model, its saved directory and its greedy generation (fp32)."""

    def __init__(self, name: str, tmp_dir) -> None:
        model_type, overrides = VARIANTS[name]
        self.name = name
        self.model = tiny_model(model_type, **overrides)
        self.path = save_tiny(self.model, tmp_dir / name)
        self.prompt = prompt_ids(batch=2, length=6, vocab=self.model.config.vocab_size)
        self.out = generate(self.model, self.prompt)

    def copy(self):
        return copy.deepcopy(self.model)


def generate(model, prompt):
    """Greedy generation of NEW_TOKENS tokens: (sequences (B, L+N), logits (N, B, V))."""
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    cache: dict[str, Reference] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = Reference(name, root)
        return cache[name]

    return get
