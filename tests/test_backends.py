"""The generation backend registry, and `run_generation` driving any object with the backend interface."""

from __future__ import annotations

import typing

import pytest

from cfdpo.backends import BACKENDS, get_backend
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams, plan_rows, run_generation
from cfdpo.runio import JsonlLog
from cfdpo.spec import Behaviour, GenerationSpec


def test_every_recipe_backend_is_registered_with_a_loader():
    names = typing.get_args(GenerationSpec.model_fields["backend"].annotation)
    assert set(BACKENDS) == set(names) == {"transformers", "vllm"}
    for name in names:
        assert get_backend(name) is BACKENDS[name]
        assert callable(get_backend(name).load)


def test_unknown_backend_is_one_line_error():
    with pytest.raises(CfdpoError) as err:
        get_backend("llamacpp")
    msg = str(err.value)
    assert "\n" not in msg
    assert "generation.backend" in msg and "'llamacpp'" in msg and "transformers, vllm" in msg


class EchoGenerator:
    """A stand-in backend: answer j of conversation i is 'i.j', one token per answer."""

    def __init__(self):
        self.calls = 0

    def generate_answers(self, tokenizer, conversations, params, num_samples, batch_size, seed, on_batch, todo=None):
        self.calls += 1
        for i in sorted(todo):
            on_batch([i], [[f"{i}.{j}" for j in range(num_samples[i])]], [[1] * num_samples[i]])


def test_run_generation_drives_any_backend_and_loads_it_only_when_needed(tmp_path):
    behaviour = Behaviour(name="b", negative="Be rude.", scorer={"name": "length", "desired": "lower"})
    prompts = [{"id": "p0", "prompt": "Hi?"}, {"id": "p1", "prompt": "Why?"}]
    rows = plan_rows(prompts, ["control", "negative"], behaviour, 2, "m", GenParams(4, 0.7, 0.9), 0)
    generator = EchoGenerator()
    loads = []

    def load_generator():
        loads.append(1)
        return generator, None

    log = JsonlLog(tmp_path / "answers.jsonl")
    assert run_generation(rows, log, load_generator) == 8
    written = {r["key"]: r for r in JsonlLog(tmp_path / "answers.jsonl").rows}
    assert [(written[r["key"]]["answer"], written[r["key"]]["n_tokens"]) for r in rows] == [
        (f"{i}.{s}", 1) for i in range(4) for s in range(2)]
    assert run_generation(rows, JsonlLog(tmp_path / "answers.jsonl"), load_generator) == 0
    assert len(loads) == 1 and generator.calls == 1


def test_transformers_backend_answers_like_its_decode_loop(tiny_model):
    from cfdpo.backends.transformers import generate_answers
    from cfdpo.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    convs = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Why is the sky blue?"}]]
    params = GenParams(6, 0.8, 0.9)

    def answers(generate):
        got = {}
        generate(convs, params, [2, 3], 4, 11, lambda idx, texts, counts: got.update(zip(idx, zip(texts, counts))))
        return got

    generator = get_backend("transformers").load(str(tiny_model), "float32")
    via_backend = answers(lambda *a: generator.generate_answers(tok, *a))
    direct = answers(lambda *a: generate_answers(generator.model, tok, *a))
    assert via_backend == direct
    assert [len(via_backend[i][0]) for i in (0, 1)] == [2, 3]
