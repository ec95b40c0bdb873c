"""cfdpo's CPU training kernels: TRL's DPO loss and loop stay, its forward gets cheaper.

- `lm_head`: only the labelled positions go through the LM head, scored in cache-sized chunks.
- `packed_pairs`: a DPO batch runs as one padding-free row in which a pair's chosen and rejected
  answers share one pass over their prompt, with its own two-part attention.
- `lora_inputs`: under bf16 the LoRA inputs skip PEFT's fp32 round trip.

Each applies only where it gives TRL's numbers (CPU, a plain LM head, sdpa attention, ...); elsewhere
TRL's own path stays. bench/run.py measures each against TRL's defaults (its `cfdpo-trlhead`,
`cfdpo-noshare`, `cfdpo-loracast` and `cfdpo-sdpa` paths switch one off), bench/kernels.py the LM head
and the attention alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from cfdpo.cpu_kernels.lm_head import lean_lm_head
from cfdpo.cpu_kernels.lora_inputs import bf16_lora_inputs
from cfdpo.cpu_kernels.packed_pairs import EAGER_MAX_SCORES, PairPacking


@dataclass(frozen=True)
class CpuKernels:
    """Which kernels a training run uses (all of them by default)."""

    lm_head: bool = True  # cfdpo's LM head (False: TRL's fused-head kernel; no packed rows either)
    shared_prompt: bool = True  # packed pair rows (False: chosen and rejected rows each run the prompt)
    bf16_lora_inputs: bool = True  # False: PEFT's fp32 cast of the LoRA inputs stays
    eager_max_scores: int = EAGER_MAX_SCORES  # packed attention with matmuls up to this many scores, else sdpa


def apply(trainer, switches: CpuKernels | None = None) -> None:
    """Patch a TRL trainer's model with the kernels `switches` turn on, where they apply."""
    switches = switches or CpuKernels()
    if switches.lm_head:
        packing = PairPacking(trainer.model.config, switches.eager_max_scores) if switches.shared_prompt else None
        lean_lm_head(trainer, packing)
    if switches.bf16_lora_inputs:
        bf16_lora_inputs(trainer)
