"""`generation.backend: vllm`: the same answers.jsonl rows as the transformers backend, made by vLLM
on a GPU (`pip install cfdpo[vllm]`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from cfdpo.errors import CfdpoError


def check_vllm() -> None:
    """A one-line CfdpoError unless vLLM is installed and a CUDA GPU is visible."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise CfdpoError("generation.backend 'vllm': vllm is not installed; `pip install cfdpo[vllm]` "
                         "on a machine with a CUDA GPU, or use backend 'transformers'") from None
    import torch

    if not torch.cuda.is_available():
        raise CfdpoError("generation.backend 'vllm': no CUDA GPU is visible; use backend 'transformers' on this machine")


class VllmGenerator:
    """A vLLM engine over one model as a generation backend."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool = False, seed: int = 0,
                 gpu_memory_utilization: float = 0.85):
        check_vllm()
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                       gpu_memory_utilization=gpu_memory_utilization)

    def generate_answers(self, tokenizer, conversations: Sequence[list[dict]], params, num_samples: Sequence[int],
                         batch_size: int, seed: int,
                         on_batch: Callable[[list[int], list[list[str]], list[list[int]]], None],
                         todo: Collection[int] | None = None) -> None:
        """vLLM schedules its own batches; `batch_size` conversations go per call so that progress is
        persisted as it comes (at least 256, vLLM is fastest with many requests in flight).

        As in the transformers backend the calls are planned over all `conversations`, each request
        seeded from its conversation's place among them, and only the calls holding a conversation in
        `todo` (default: all) are made, whole."""
        from vllm import SamplingParams

        chunk = max(256, batch_size)
        for b in range(0, len(conversations), chunk):
            idx = list(range(b, min(b + chunk, len(conversations))))
            if todo is not None and not any(i in todo for i in idx):
                continue
            prompts, sampling = [], []
            for i in idx:
                ids = tokenizer.apply_chat_template(conversations[i], add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
                prompts.append({"prompt_token_ids": list(ids["input_ids"] if isinstance(ids, dict) else ids)})
                sampling.append(SamplingParams(
                    n=num_samples[i], max_tokens=params.max_new_tokens, seed=seed * 1_000_003 + i,
                    temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
                    skip_special_tokens=True,
                ))
            outs = self.llm.generate(prompts, sampling, use_tqdm=False)
            answers, counts = outputs_to_answers(outs)
            on_batch(idx, answers, counts)


def outputs_to_answers(outs) -> tuple[list[list[str]], list[list[int]]]:
    """vLLM RequestOutputs -> (answers, token counts) per conversation, as the transformers backend
    gives them: stripped text, and new tokens counted up to and including the stop token."""
    answers, counts = [], []
    for o in outs:
        answers.append([c.text.strip() for c in o.outputs])
        counts.append([len(c.token_ids) for c in o.outputs])
    return answers, counts


def load(model_path: str, dtype: str, trust_remote_code: bool = False, seed: int = 0) -> VllmGenerator:
    """A vLLM engine seeded with `seed`; a one-line CfdpoError without vLLM or a CUDA GPU."""
    return VllmGenerator(model_path, dtype, trust_remote_code, seed)
