"""cfdpo's CPU LM head for TRL's fused-head calls gives what TRL's own kernel gives, gradients included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def _outputs(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + out.loss).backward()
    grad = next(p for n, p in model.named_parameters() if "lora_A" in n).grad.clone()
    return out, grad


def test_lean_head_matches_trl_fused_head(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from cfdpo.cpu_kernels.lm_head import lean_lm_head

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(3, base.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 9:] = -100  # padding
    want, want_grad = _outputs(model, ids, labels)
    assert lean_lm_head(SimpleNamespace(model=model))
    got, got_grad = _outputs(model, ids, labels)
    for field in ("log_probs", "entropy", "mean_logits"):
        assert getattr(got, field).shape == getattr(want, field).shape
        assert torch.allclose(getattr(got, field), getattr(want, field), atol=1e-4), field
    assert torch.equal(got.is_top1.bool(), want.is_top1.bool())
    assert torch.equal(got.label_mask, want.label_mask)
    assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-4)
    assert torch.allclose(got_grad, want_grad, atol=1e-5)
    plain = model(input_ids=ids)  # calls without the fused head are the model's own forward
    assert plain.logits.shape == (3, 12, base.config.vocab_size)


def test_lean_head_leaves_unpatched_models_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    from cfdpo.cpu_kernels.lm_head import lean_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not lean_lm_head(SimpleNamespace(model=model))
    assert "forward" not in model.__dict__


def _pair_batch(vocab: int):
    """TRL's DPO layout: rows i and i+3 share a prompt (lengths 4, 6, 2), completions of other lengths,
    right-padded."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (4, 6, 2)]
    comps = [torch.randint(3, vocab, (n,), generator=g) for n in (5, 2, 7, 3, 6, 1)]
    rows = [torch.cat([prompts[i % 3], c]) for i, c in enumerate(comps)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(6, width, dtype=torch.long)
    att = torch.zeros(6, width, dtype=torch.long)
    labels = torch.full((6, width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)], att[i, : len(r)] = r, 1
        labels[i, len(prompts[i % 3]) : len(r)] = r[len(prompts[i % 3]) :]
    return ids, att, labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_pass_matches_trl_fused_head(tiny_model, attn, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from cfdpo.cpu_kernels.lm_head import lean_lm_head
    from cfdpo.cpu_kernels.packed_pairs import PairPacking, shared_prompt

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, att, labels = _pair_batch(base.config.vocab_size)
    prompt_len, comp_len = shared_prompt({"input_ids": ids, "attention_mask": att, "use_cache": False}, labels)
    assert prompt_len.tolist() == [4, 6, 2] and comp_len.tolist() == [5, 2, 7, 3, 6, 1]

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]
        return out, grads

    want, want_grads = run()
    assert lean_lm_head(SimpleNamespace(model=model), PairPacking(base.config))
    from transformers.integrations import sdpa_attention

    from cfdpo.cpu_kernels import packed_pairs

    calls = {"pairs": 0}
    pair_attention = packed_pairs.pair_attention

    def counted(*a, **kw):
        calls["pairs"] += kw.get("cfdpo_pairs") is not None
        return pair_attention(*a, **kw)

    monkeypatch.setattr(packed_pairs, "pair_attention", counted)
    if attn == "sdpa":  # packed: every layer's attention is cfdpo's, never the masked fallback
        monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: pytest.fail("fallback"))
    got, got_grads = run()
    assert calls["pairs"] == (base.config.num_hidden_layers if attn == "sdpa" else 0)  # eager models: TRL's rows
    assert torch.allclose(got.log_probs, want.log_probs, atol=1e-4)
    assert torch.allclose(got.entropy, want.entropy, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():  # the reference pass: log-probs only, no metrics
        ref = model(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True)
    assert ref.entropy is None and ref.log_probs.shape == want.log_probs.shape


def test_shared_prompt_falls_back_for_a_model_without_extra_arguments(tiny_model):
    """A model whose forward takes no extra keyword arguments (custom code) trains on TRL's rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from cfdpo.cpu_kernels.lm_head import lean_lm_head
    from cfdpo.cpu_kernels.packed_pairs import PairPacking

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    ids, att, labels = _pair_batch(base.config.vocab_size)
    want = model(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True).log_probs
    body, forward = base.model, base.model.forward
    body.forward = lambda input_ids=None, attention_mask=None, position_ids=None, use_cache=None: forward(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
    assert lean_lm_head(SimpleNamespace(model=model), PairPacking(base.config))
    for _ in range(2):  # the first call finds out, the second goes straight to TRL's rows
        got = model(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True).log_probs
        assert torch.allclose(got, want, atol=1e-4)
    assert base.config._attn_implementation == "sdpa"


def test_shared_prompt_needs_the_pair_layout():
    from cfdpo.cpu_kernels.packed_pairs import shared_prompt

    ids, att, labels = _pair_batch(100)
    kw = {"input_ids": ids, "attention_mask": att}
    assert shared_prompt(kw, labels) is not None
    other = ids.clone()
    other[4, 1] += 1  # rejected row of pair 1 with another prompt token
    assert shared_prompt({**kw, "input_ids": other}, labels) is None
    assert shared_prompt({"input_ids": ids[:5], "attention_mask": att[:5]}, labels[:5]) is None  # odd rows
    gap = labels.clone()
    gap[0, 6] = -100  # a hole in a completion
    assert shared_prompt(kw, gap) is None


def test_bf16_lora_inputs_skips_the_round_trip_cast(tiny_model):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from cfdpo.cpu_kernels.lora_inputs import bf16_lora_inputs

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # PEFT keeps the adapter in fp32 for training
    ids = torch.randint(3, base.config.vocab_size, (2, 9))

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().sum().backward()
        return logits, [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]

    want, want_grads = run()
    assert not bf16_lora_inputs(SimpleNamespace(model=model, args=SimpleNamespace(bf16=False)))
    assert bf16_lora_inputs(SimpleNamespace(model=model, args=SimpleNamespace(bf16=True)))
    assert all(not m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
    got, got_grads = run()
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_picked_log_probs_is_log_softmax_gather(dtype):
    from cfdpo.cpu_kernels.lm_head import picked_log_probs

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(11, 97, generator=g) * 4).to(dtype)
    target = torch.randint(0, 97, (11,), generator=g)
    weight = torch.randn(11, generator=g)
    ref = logits.clone().requires_grad_()
    logp = torch.log_softmax(ref.float(), -1)
    want = logp.gather(-1, target[:, None])[:, 0]
    (want * weight).sum().backward()
    x = logits.clone().requires_grad_()
    picked, ent, mean, top, lss = picked_log_probs(x, target, metrics=True, wpo=True, chunk=4)  # 11 rows: a short last chunk
    (picked * weight).sum().backward()
    assert torch.equal(x.detach(), logits)  # the caller's logits are not overwritten (fp32: no copy by .float())
    assert torch.allclose(picked, want, atol=1e-5)
    assert x.grad.dtype == dtype
    assert torch.allclose(x.grad.float(), ref.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    p = logp.exp()
    assert torch.allclose(ent, -(p * logp).sum(-1), atol=1e-5)
    assert torch.allclose(mean, ref.float().mean(-1), atol=1e-5)
    assert torch.equal(top, ref.float().argmax(-1) == target)
    assert torch.allclose(lss, torch.logsumexp(2 * logp, -1), atol=1e-5)
    assert not ent.requires_grad and picked.requires_grad
    picked, *rest = picked_log_probs(logits, target, metrics=False)
    assert rest == [None, None, None, None] and torch.allclose(picked, want, atol=1e-5)


@pytest.mark.parametrize("eager", [True, False])
def test_pair_attention_is_masked_attention(eager):
    """The two-part attention of a packed pair row equals sdpa over the row with its full mask (grouped
    heads, pairs of different lengths), outputs and gradients, through both of its arithmetic paths."""
    from cfdpo.cpu_kernels import packed_pairs
    ids = torch.arange(40).repeat(4, 1)
    prompt_len, comp_len = torch.tensor([3, 5]), torch.tensor([4, 2, 1, 6])  # chosen 4, 2; rejected 1, 6
    seen = {}

    class Body(torch.nn.Module):  # stands in for the model: records what shared_prompt_hidden hands it
        config = SimpleNamespace(_attn_implementation="sdpa")

        def forward(self, **kw):
            seen.update(kw)
            return SimpleNamespace(last_hidden_state=torch.zeros(1, kw["input_ids"].shape[1], 1))

    packed_pairs.shared_prompt_hidden(Body(), ids, prompt_len, comp_len, eager_max_scores=2**23 if eager else 0)
    assert seen["input_ids"].shape[1] == 3 + 4 + 1 + 5 + 2 + 6  # no padding
    assert seen["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 0, 1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    full, parts = seen["attention_mask"], seen["cfdpo_pairs"]
    assert full[0, 0, 7].tolist()[:8] == [True, True, True, False, False, False, False, True]  # rejected: prompt + itself
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 21, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    module = SimpleNamespace(training=True)
    with torch.enable_grad():
        got = packed_pairs.pair_attention(module, q, k, v, full, scaling=0.3, cfdpo_pairs=parts)[0]
        (got * torch.arange(got.numel()).view(got.shape).sin()).sum().backward()
    got_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=0.3, enable_gqa=True)
    want = want.transpose(1, 2)
    (want * torch.arange(want.numel()).view(want.shape).sin()).sum().backward()
    assert got.shape == want.shape == (1, 21, 4, 8)
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(got_grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(a, b, atol=1e-5)
