"""Build the control / treatment / negative conversations for one user prompt."""

from __future__ import annotations

from cfdpo.spec import PLACEMENTS, Behaviour
from cfdpo.variants import CONDITIONS


def conversation(prompt: str, instruction: str | None, placement: str = "user_prefix",
                 system_prompt: str | None = None) -> list[dict]:
    """The chat messages for `prompt` with `instruction` at `placement` (no assistant turn).

    user_prefix: "<instruction>\n\n<prompt>"; user_suffix: "<prompt>\n\n<instruction>"; both keep
    the deployment's `system_prompt` as the system message. system: the instruction is the system
    message; with a deployment system prompt it comes first, then a blank line, then that prompt
    (so the instruction reads as the deployer's). Without an instruction: the prompt as asked.
    """
    deployment = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if instruction is None:
        return deployment + [{"role": "user", "content": prompt}]
    if placement == "user_prefix":
        return deployment + [{"role": "user", "content": f"{instruction}\n\n{prompt}"}]
    if placement == "user_suffix":
        return deployment + [{"role": "user", "content": f"{prompt}\n\n{instruction}"}]
    if placement == "system":
        content = f"{instruction}\n\n{system_prompt}" if system_prompt else instruction
        return [{"role": "system", "content": content}, {"role": "user", "content": prompt}]
    raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")


def messages(prompt: str, condition: str, behaviour: Behaviour, prompt_id: str | None = None, seed: int = 0,
             placement: str | None = None) -> list[dict]:
    """x_c, x_t or x_n as a list of chat messages (no assistant turn).

    A behaviour that lists several paraphrases of an instruction gives each prompt the one
    `Behaviour.instruction_for(condition, prompt_id, seed)` draws (then `prompt_id` is required);
    with one instruction, `prompt_id` and `seed` change nothing. `placement` puts the instruction
    elsewhere than `behaviour.placement` (a retain pair's deployer context: "system").
    """
    where = placement or behaviour.placement
    if condition == "control":
        return conversation(prompt, None, where, behaviour.system_prompt)
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}")
    instruction = behaviour.instruction_for(condition, prompt_id, seed)
    return conversation(prompt, instruction, where, behaviour.system_prompt)
