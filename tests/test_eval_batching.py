"""Evaluation's batched passes give what one row at a time gives: the NLL pass (`mean_nll`, only the
answers' positions through the LM head) and the transformers backend's mixed-adapter batches
(`adapter_names`, measured by bench/eval_batching.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cfdpo.generate import GenParams

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Name a fruit."}],
    [{"role": "user", "content": "Talk like a pirate.\n\nHow do magnets work? Explain in detail please."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]
ANSWERS = ["Paris.", "Arr matey, a banana it be, ye landlubber!", "", "Because of the way air scatters light."]


def reference_nll(model, tok, conversations, answers) -> float:
    """Token-weighted NLL, one unpadded conversation at a time, every position through the LM head."""
    import torch

    total, count = 0.0, 0
    for conv, ans in zip(conversations, answers):
        prompt = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(conv + [{"role": "assistant", "content": ans}], tokenize=True,
                                       return_dict=False)
        if full[: len(prompt)] != prompt or len(full) <= len(prompt):
            continue
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        total -= sum(float(logp[pos - 1, full[pos]]) for pos in range(len(prompt), len(full)))
        count += len(full) - len(prompt)
    return total / count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_mean_nll_is_the_unbatched_nll_of_the_answer_tokens(tiny_model, batch_size):
    from cfdpo.likelihood import mean_nll
    from cfdpo.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "float32").eval()
    got = mean_nll(model, tok, CONVERSATIONS, ANSWERS, batch_size=batch_size)
    assert math.isclose(got, reference_nll(model, tok, CONVERSATIONS, ANSWERS), rel_tol=1e-5)


def save_adapter(model_dir: Path, out: Path, seed: int) -> None:
    """A random LoRA adapter (B not zero, so it changes the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)


def test_mixed_adapter_batches_give_each_models_own_greedy_answers(tiny_model, tmp_path):
    from peft import PeftModel

    from cfdpo.backends.transformers import generate_answers
    from cfdpo.models import load_model, load_tokenizer

    names = ["one", "two"]
    for seed, name in enumerate(names):
        save_adapter(tiny_model, tmp_path / name, seed)
    tok = load_tokenizer(str(tiny_model))
    tok.padding_side = "left"
    model = PeftModel.from_pretrained(load_model(str(tiny_model), "float32"), str(tmp_path / "one"), adapter_name="one")
    model.load_adapter(str(tmp_path / "two"), adapter_name="two")
    model.eval()
    params = GenParams(10, 0.0, 1.0)

    def answers(conversations, adapter_names=None) -> list[str]:
        out = [""] * len(conversations)

        def on_batch(indices, texts, _counts):
            for i, text in zip(indices, texts):
                out[i] = text[0]

        generate_answers(model, tok, conversations, params, [1] * len(conversations), 3, 0, on_batch,
                         adapter_names=adapter_names)
        return out

    alone = {}
    for label in ["base", *names]:
        if label == "base":
            model.base_model.disable_adapter_layers()
        else:
            model.base_model.enable_adapter_layers()
            model.set_adapter(label)
        alone[label] = answers(CONVERSATIONS)
    model.base_model.enable_adapter_layers()
    labels = ["base", *names]
    mixed = answers([c for _ in labels for c in CONVERSATIONS],
                    [("__base__" if label == "base" else label) for label in labels for _ in CONVERSATIONS])
    assert mixed == [a for label in labels for a in alone[label]]
    assert alone["one"] != alone["base"] and alone["two"] != alone["base"]  # the adapters change the answers


def test_prompted_reuses_base_greedy_answers_to_the_same_conversation(tmp_path):
    """The prompted model is the base model: under control it gets the treatment instruction, which is
    base's treatment condition, so those greedy answers are taken from base instead of decoded again."""
    from types import SimpleNamespace

    from cfdpo.evaluate import AnswerPlan, decode_answers
    from cfdpo.runio import JsonlLog

    asked: dict[str, list] = {}

    class Recorder:
        def __init__(self, label):
            self.label = label

        def generate_answers(self, tok, conversations, params, num_samples, batch_size, seed, on_batch, todo=None):
            asked.setdefault(self.label, []).extend(conversations)
            on_batch(list(range(len(conversations))), [[f"{self.label} {i}"] * k for i, k in enumerate(num_samples)],
                     [[1] * k for k in num_samples])

    greedy, sampled = GenParams(8, 0.0, 1.0), GenParams(8, 0.8, 0.9)
    plan = AnswerPlan(greedy, 0, 1, sampled, 1, 0)
    treated = [{"role": "user", "content": "Be plain.\n\nWhy?"}]
    plain = [{"role": "user", "content": "Why?"}]

    def row(label, cond, msgs, sampled_row=False):
        params = sampled if sampled_row else greedy
        return {"key": f"{label}|{cond}|{sampled_row}", "prompt_id": "p0", "prompt": "Why?", "condition": cond,
                "sample": 0, "sampled": sampled_row, "messages": msgs, "model": label, "gen": params.as_dict(),
                "seed": 1 if sampled_row else 0, "model_label": label}

    rows_by = {("base", "control"): [row("base", "control", plain), row("base", "control", plain, True)],
               ("base", "treatment"): [row("base", "treatment", treated), row("base", "treatment", treated, True)],
               ("prompted", "control"): [row("prompted", "control", treated), row("prompted", "control", treated, True)]}
    models = SimpleNamespace(labels=["base", "prompted"], generator=lambda label: (Recorder(label), None))
    done = decode_answers(models, rows_by, JsonlLog(tmp_path / "answers.jsonl"), 4, plan)

    base_treated = done["base|treatment|False"]["answer"]
    assert done["prompted|control|False"]["answer"] == base_treated
    assert asked["prompted"] == [treated]  # only the sampled row is decoded again: its draw is its own
    assert done["prompted|control|True"]["answer"].startswith("prompted")


SHARING = [
    [{"role": "system", "content": "You are a ship's cook."}, {"role": "user", "content": "Talk like a pirate.\n\nName a fruit."}],
    [{"role": "system", "content": "You are a ship's cook."}, {"role": "user", "content": "Talk like a pirate.\n\nWhy is the sea salty?"}],
    [{"role": "system", "content": "You are a ship's cook."}, {"role": "user", "content": "How do magnets work?"}],
    [{"role": "user", "content": "Why is the sky blue? Explain it to a child in two sentences."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]


@pytest.mark.parametrize("k", [1, 2])
def test_a_shared_prompt_prefix_is_read_once_with_the_same_result(tiny_model, k):
    """`prefill` reads the prefix rows share once per group: same first logits and the same answers
    (greedy, and sampled with the same seed) as reading every row whole."""
    import torch

    from cfdpo.backends.transformers import cache_kwarg, decode, pad_batch, prefill, prefix_groups
    from cfdpo.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "float32").eval()
    seqs = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in SHARING]
    assert prefix_groups(seqs, min_shared=12) == [([0, 1, 2], 23), ([4, 3], 36)]  # the cook's three, the sky's two
    assert prefix_groups(seqs, min_shared=4) == [([0, 1, 2, 4, 3], 10)]  # the template's start: a group of all
    stop = torch.tensor([tok.eos_token_id])
    with torch.inference_mode():
        _, logits, _, last = prefill(model, seqs, tok.pad_token_id, None, cache_kwarg(model), min_shared=12)
        ids, mask = pad_batch(seqs, tok.pad_token_id)
        whole = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        assert torch.allclose(logits, whole, atol=1e-4)
        assert last.tolist() == [len(s) - 1 for s in seqs]
        for params in (GenParams(12, 0.0, 1.0), GenParams(12, 1.0, 0.9)):
            shared = decode(model, seqs, tok.pad_token_id, k, params, stop, 7, min_shared=12)
            alone = decode(model, seqs, tok.pad_token_id, k, params, stop, 7, min_shared=10_000)
            assert torch.equal(shared, alone)
