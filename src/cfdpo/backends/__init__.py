"""Generation backends by name (the recipe's `generation.backend`).

Each backend is a module with `load(model_path, dtype, trust_remote_code, seed)` that returns a
generator: an object whose `generate_answers(tokenizer, conversations, params, num_samples,
batch_size, seed, on_batch)` answers `num_samples[i]` times each conversation and hands each batch
to `on_batch(indices, answers, token_counts)` (see `generate.run_generation`, which caches,
resumes and shards the same way whatever the backend).
"""

from __future__ import annotations

from types import ModuleType

from cfdpo.backends import transformers, vllm
from cfdpo.errors import CfdpoError

BACKENDS: dict[str, ModuleType] = {"transformers": transformers, "vllm": vllm}


def get_backend(name: str) -> ModuleType:
    """The backend module registered as `name`."""
    if name not in BACKENDS:
        raise CfdpoError(f"generation.backend: unknown backend '{name}'; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
