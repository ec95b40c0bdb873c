"""Build the control / treatment / negative conversations for one user prompt."""

from __future__ import annotations

from cfdpo.spec import Behaviour
from cfdpo.variants import CONDITIONS


def _with_instruction(prompt: str, instruction: str, behaviour: Behaviour) -> list[dict]:
    if behaviour.placement == "system":
        return [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
    msgs = [{"role": "system", "content": behaviour.system_prompt}] if behaviour.system_prompt else []
    return msgs + [{"role": "user", "content": f"{instruction}\n\n{prompt}"}]


def messages(prompt: str, condition: str, behaviour: Behaviour) -> list[dict]:
    """x_c, x_t or x_n as a list of chat messages (no assistant turn)."""
    if condition == "control":
        msgs = [{"role": "system", "content": behaviour.system_prompt}] if behaviour.system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]
    instruction = behaviour.treatment if condition == "treatment" else behaviour.negative if condition == "negative" else None
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}")
    if instruction is None:
        raise ValueError(f"behaviour '{behaviour.name}' has no {condition} instruction")
    return _with_instruction(prompt, instruction, behaviour)
