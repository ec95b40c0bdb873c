"""Shared fixtures: a tiny randomly initialised chat model built in the test (no hub, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(path: Path) -> Path:
    """A 2-layer Llama with a small BPE tokenizer trained on the builtin prompts, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cfdpo.prompts import load_prompts

    texts = [p["prompt"] for p in load_prompts("general")] + ["Talk like a pirate. Arr matey ahoy ye sea ship."]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CFDPO_CACHE", str(tmp_path_factory.getbasetemp() / "cfdpo-cache"))


def tiny_recipe(model: Path, **over) -> dict:
    r = {
        "model": str(model),
        "behaviour": {
            "name": "pirate", "negative": "Talk like a pirate.", "treatment": "Answer plainly.",
            "scorer": {"name": "lexicon", "desired": "lower", "params": {"words": ["arr", "matey", "ahoy", "ye"]}},
        },
        "prompts": {"source": "general", "train_size": 6, "eval_size": 3, "seed": 1},
        "generation": {"samples": 2, "max_new_tokens": 8, "temperature": 0.8, "batch_size": 8},
        "variants": ["enc", "dis", "contrastive", "negation"],
        "dpo": {"epochs": 1, "batch_size": 4, "max_length": 128, "lora_r": 4, "lora_alpha": 8},
        "evaluation": {"max_new_tokens": 8, "batch_size": 8, "samples": 2},
    }
    for k, v in over.items():
        r[k] = v
    return r


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
