"""The transformers backend's decode loop against transformers' own generate and logits warpers."""

from __future__ import annotations

import pytest
import torch

from cfdpo.backends.transformers import decode, nucleus, sample_next
from cfdpo.generate import GenParams


@pytest.mark.parametrize("vocab,scale", [(1000, 4.0), (300, 0.01)])  # peaked: candidates suffice; flat: full sort
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_nucleus_keeps_what_transformers_top_p_keeps(vocab, scale, top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, vocab) * scale
    ref = torch.softmax(TopPLogitsWarper(top_p)(None, logits.clone()), dim=-1)
    top, idx = nucleus(torch.softmax(logits, dim=-1), top_p)
    ours = torch.zeros_like(ref).scatter(-1, idx, top)
    ours = ours / ours.sum(-1, keepdim=True)
    assert torch.equal(ours > 0, ref > 0)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_sample_next_greedy_and_seeded():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample_next(logits, GenParams(4, 0.0, 1.0), None).tolist() == [1, 0]

    def draw():
        return sample_next(logits.repeat(50, 1), GenParams(4, 1.0, 0.9), torch.Generator().manual_seed(3))

    assert torch.equal(draw(), draw())


def _batch(tok, texts):
    enc = tok([tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
               for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def unpadded(ids, mask) -> list[list[int]]:
    """The token lists of a left-padded batch: what `decode` takes."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def test_greedy_decode_matches_model_generate_with_early_stops(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids, mask = _batch(tok, ["What is two plus two?", "Name a colour.", "Why is the sky blue on a clear day?"])
    with torch.inference_mode():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
        # a stop token that ends rows at different steps, so rows leave the batch mid-way
        stop = int(free[0, 4])
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             eos_token_id=stop, pad_token_id=stop)[:, ids.shape[1]:]
        ours = decode(model, unpadded(ids, mask), tok.pad_token_id, 1, GenParams(12, 0.0, 1.0), torch.tensor([stop]), seed=0)
    assert (ours == stop).any(dim=1).sum() >= 1
    assert torch.equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == stop).all()


def test_sampled_decode_gives_k_rows_per_prompt_reproducibly(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids, mask = _batch(tok, ["Name a colour.", "Why is the sky blue on a clear day?"])
    stop = torch.tensor([tok.eos_token_id])
    with torch.inference_mode():
        a = decode(model, unpadded(ids, mask), tok.pad_token_id, 3, GenParams(10, 0.7, 0.9), stop, seed=5)
        b = decode(model, unpadded(ids, mask), tok.pad_token_id, 3, GenParams(10, 0.7, 0.9), stop, seed=5)
        c = decode(model, unpadded(ids, mask), tok.pad_token_id, 3, GenParams(10, 0.7, 0.9), stop, seed=6)
    assert a.shape == (6, 10)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r) for r in a[:3].tolist()}) > 1  # the k samples of one prompt differ


def test_resumed_generation_writes_the_answers_of_an_uninterrupted_run(tiny_model, tmp_path):
    """A kill leaves whole batches, a batch cut short and a cut line; the rerun fills in exactly the
    texts an uninterrupted run writes (each batch keeps its composition and seed)."""
    from cfdpo.backends import get_backend
    from cfdpo.generate import plan_rows, run_generation
    from cfdpo.models import load_tokenizer
    from cfdpo.runio import JsonlLog
    from cfdpo.spec import Behaviour

    behaviour = Behaviour(name="b", negative="Be rude.", scorer={"name": "length", "desired": "lower"})
    prompts = [{"id": f"p{i}", "prompt": "Why " * (i % 3 + 1) + f"is {i} a number?"} for i in range(5)]
    rows = plan_rows(prompts, ["control", "negative"], behaviour, 2, "m", GenParams(5, 1.0, 0.95), 0)
    tok = load_tokenizer(str(tiny_model))
    tok.padding_side = "left"
    generator = get_backend("transformers").load(str(tiny_model), "float32")

    def generate(path):
        return run_generation(rows, JsonlLog(path), lambda: (generator, tok), batch_size=4, seed=3)

    whole = tmp_path / "whole.jsonl"
    assert generate(whole) == len(rows)
    lines = whole.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"  # batches of 2 conversations x 2 samples: the 2nd batch lost a row, then a cut line
    cut.write_bytes(b"".join(lines[:7]) + lines[7][:20])
    assert generate(cut) == len(rows) - 7
    answers = {r["key"]: r["answer"] for r in JsonlLog(whole).rows}
    resumed = JsonlLog(cut).rows
    assert len(resumed) == len(rows) and {r["key"]: r["answer"] for r in resumed} == answers
    assert len(set(answers.values())) > len(rows) // 2  # sampled, not all alike
