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

    from cfdpo.train import lean_lm_head

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

    from cfdpo.train import lean_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not lean_lm_head(SimpleNamespace(model=model))
    assert "forward" not in model.__dict__
