"""LoRA layers that take their bf16 inputs as they are on CPU under bf16 autocast."""

from __future__ import annotations


def bf16_lora_inputs(trainer) -> bool:
    """On CPU under bf16 autocast, hand the LoRA layers their bf16 inputs as they are. PEFT casts a LoRA
    layer's input to its fp32 weights' dtype, and autocast casts it straight back to bf16 for the
    matmul: two copies of the activations per adapted projection, forward and backward, for the same
    numbers (the losses of a run are identical with and without them). Returns whether it applied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    args = getattr(trainer, "args", None)
    if not getattr(args, "bf16", False) or next(trainer.model.parameters()).device.type != "cpu":
        return False
    layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return bool(layers)
