"""`cfdpo serve`: a real server process on a free localhost port, driven with the official openai client."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_chat import PROMPT, cfdpo_env, make_tiny_run

from cfdpo.cli import main

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(run: Path, log: Path, ready_within_s: float = 240.0):
    """`cfdpo serve RUN` on a free 127.0.0.1 port, its output in `log`; yields the API's base URL once
    /v1/models answers, and always stops the process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cfdpo", "serve", str(run), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=cfdpo_env())
    try:
        deadline = time.monotonic() + ready_within_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready after {ready_within_s:.0f} s:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def posts(log: Path) -> int:
    """Chat completion requests the server has answered so far (its access log)."""
    return log.read_text().count("POST /v1/chat/completions")


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run = make_tiny_run(tiny_model, root)
    with running_server(run, root / "server.log") as url:
        yield url, run, root / "server.log"


def client(url: str):
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)


def ask(url: str, model: str, prompt: str = PROMPT, **extra):
    return client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **extra)


def test_models_lists_base_and_every_adapter(served):
    url, _, _ = served
    assert [m.id for m in client(url).models.list()] == ["base", "enc", "negation"]


def test_base_and_adapter_answer_in_the_openai_shape(served):
    url, _, _ = served
    texts = {}
    for model in ("base", "enc"):
        r = ask(url, model, max_tokens=6, temperature=0)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model and r.created > 0
        (choice,) = r.choices
        assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content.strip()
        assert choice.finish_reason == "length"  # this tiny model never says its stop token
        assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 6
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        texts[model] = choice.message.content
    assert texts["base"] != texts["enc"]


def test_greedy_answers_equal_cfdpo_chat_prompt(served, capsys):
    url, run, _ = served
    for model in ("base", "negation"):
        served_text = ask(url, model, max_tokens=10, temperature=0).choices[0].message.content
        capsys.readouterr()
        assert main(["chat", str(run), "--adapter", model, "--prompt", PROMPT, "--max-new-tokens", "10"]) == 0
        assert capsys.readouterr().out == served_text + "\n"


def test_logprobs_are_the_answer_tokens_with_their_top_alternatives(served):
    url, _, _ = served
    for model in ("enc", "negation", "base"):  # which answers repeat one token depends on the CPU's arithmetic
        for prompt in ("hello", PROMPT):
            choice = ask(url, model, prompt, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3).choices[0]
            tokens = choice.logprobs.content
            assert "".join(t.token for t in tokens) == choice.message.content
            for t in tokens:
                assert len(t.top_logprobs) == 3
                values = [alt.logprob for alt in t.top_logprobs]
                assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
                assert sum(math.exp(v) for v in values) <= 1 + 1e-5
                assert t.logprob <= values[0] + 1e-5
                assert t.bytes == list(t.token.encode())
            # greedy: each answer token is the most likely one
            assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4 for t in tokens)
    assert ask(url, "enc", max_tokens=5, temperature=0).choices[0].logprobs is None


def test_logprobs_are_of_the_generated_tokens_when_the_text_encodes_to_others(served):
    """An answer whose first token starts with a space is stripped; encoding the text again gives other
    tokens ("pr" is not " pr": seen on a CPU with native bf16, where the adapters answer " pr pr ..."), so the log-probabilities must come from the tokens generated."""
    import torch

    from cfdpo.chat import Reply, load_run_model
    from cfdpo.serve import token_logprobs

    run_model = load_run_model(served[1])
    tok = run_model.tokenizer
    generated = tok.encode(" pr ween 4\n", add_special_tokens=False)
    assert len(set(generated)) >= 4  # tokens that differ, so positions are told apart
    assert tok.encode("pr ween 4", add_special_tokens=False) != generated[:-1]
    messages = run_model.conversation("hello")
    content = token_logprobs(run_model, messages, Reply("pr ween 4", 3, len(generated) + 1, tuple(generated)), "enc", 2)
    assert "".join(t["token"] for t in content) == "pr ween 4"
    assert len(content) == len(generated) - 1  # the trailing newline token is stripped with the text
    prompt = run_model.prompt_ids(messages)
    with run_model.using("enc") as model, torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + generated])).logits[0].float(), -1)
    direct = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(generated)]
    assert [t["logprob"] for t in content] == pytest.approx(direct[: len(content)], abs=1e-4)


def test_unknown_model_is_404_with_an_openai_error_body(served):
    url, _, _ = served
    with pytest.raises(openai.NotFoundError) as caught:
        ask(url, "nope", max_tokens=2)
    error = caught.value.body
    assert error["type"] == "not_found_error" and error["code"] == "model_not_found" and error["param"] == "model"
    assert "available: base, enc, negation" in error["message"]


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"stream": True}, "stream"), ({"temperature": -1}, "temperature")])
def test_unsupported_or_bad_requests_are_400(served, extra, param):
    url, _, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        ask(url, "base", max_tokens=2, **extra)
    assert caught.value.body["param"] == param


def test_a_busy_port_is_a_one_line_error(served, capsys):
    url, run, _ = served
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert main(["serve", str(run), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}" in err
