"""`cfdpo serve`: a run's base model and every adapter behind an OpenAI-compatible HTTP API.

    GET  /v1/models             ids: `base` and each adapter name
    POST /v1/chat/completions   messages, model, max_tokens, temperature, top_p, n=1, seed,
                                logprobs / top_logprobs (at most 20)

One model is in memory (`chat.RunModel`) and requests are answered one at a time. A request
without a system message gets the recipe's system prompt, as the run's control prompts had, so a
single user message is answered exactly like `cfdpo chat --prompt`. Log-probabilities are those
of the answer's tokens as the tokenizer encodes the answer text, from one forward pass after
generation. Details: docs/SERVE.md.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from cfdpo.chat import GenParams, Reply, RunModel, load_run_model
from cfdpo.errors import CfdpoError

TOP_LOGPROBS_MAX = 20  # OpenAI's own limit


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI fields (user, stop, ...) are accepted and not used

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    stream: bool = False


class RequestError(Exception):
    """A request the server refuses, answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def with_run_system(messages: list[dict], run_model: RunModel) -> list[dict]:
    """The request's messages, behind the recipe's system prompt when the request has no system message."""
    system = run_model.recipe.behaviour.system_prompt
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def token_logprobs(run_model: RunModel, messages: list[dict], reply: Reply, name: str, top: int) -> list[dict]:
    """OpenAI `logprobs.content` for `reply`: each generated token's log-probability and the `top` most
    likely tokens at its position. The tokens are the ones generated (`reply.token_ids`), not an encoding
    of the text, which need not give them back; the answer text is stripped of surrounding whitespace, so
    whitespace-only tokens at either end are left out and the first and last pieces are trimmed, so that the
    pieces join to the text."""
    import torch

    tokenizer = run_model.tokenizer
    prompt = run_model.prompt_ids(messages)
    answer = list(reply.token_ids)
    if not answer:
        return []
    with run_model.using(name) as model, torch.inference_mode():
        ids = torch.tensor([prompt + answer], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().cpu()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, torch.tensor(answer)[:, None])[:, 0].tolist()
    best = logp.topk(top, dim=-1) if top else None

    def entry(piece: str, value: float) -> dict:
        return {"token": piece, "logprob": value, "bytes": list(piece.encode("utf-8"))}

    pieces = [tokenizer.decode([t]) for t in answer]
    keep = [i for i, piece in enumerate(pieces) if piece.strip()]
    if keep:
        first, last = keep[0], keep[-1]
        pieces[first] = pieces[first].lstrip()
        pieces[last] = pieces[last].rstrip()
        keep = list(range(first, last + 1))
    return [
        {**entry(pieces[i], chosen[i]),
         "top_logprobs": [entry(tokenizer.decode([t]), v) for t, v in zip(best.indices[i].tolist(), best.values[i].tolist())]
         if best else []}
        for i in keep
    ]


def complete(run_model: RunModel, request: ChatRequest, default_max_tokens: int) -> dict:
    """One chat completion in OpenAI's response shape."""
    if request.model not in run_model.names:
        raise RequestError(404, f"model '{request.model}' not found; available: {', '.join(run_model.names)}",
                           "model", "model_not_found")
    if request.n != 1:
        raise RequestError(400, "n: only n=1 is supported", "n")
    if request.stream:
        raise RequestError(400, "stream: streaming is not supported", "stream")
    messages = with_run_system([m.model_dump() for m in request.messages], run_model)
    max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens
    params = GenParams(max_tokens, request.temperature, request.top_p)
    reply = run_model.answer(messages, request.model, params, request.seed or 0)
    choice = {
        "index": 0, "message": {"role": "assistant", "content": reply.text}, "logprobs": None,
        "finish_reason": "length" if reply.completion_tokens >= max_tokens else "stop",
    }
    if request.logprobs:
        top = request.top_logprobs or 0
        choice["logprobs"] = {"content": token_logprobs(run_model, messages, reply, request.model, top)}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": request.model, "choices": [choice],
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
    }


def make_app(run_model: RunModel, default_max_tokens: int):
    """The FastAPI application; requests take turns on the one model."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title="cfdpo serve", docs_url=None, redoc_url=None)
    turn = threading.Lock()
    started = int(time.time())

    @app.exception_handler(RequestError)
    def refused(_request: Request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    def invalid(_request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return JSONResponse(RequestError(400, f"{where}: {first.get('msg', 'invalid')}", where or None).body(),
                            status_code=400)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": started, "owned_by": "cfdpo"} for name in run_model.names]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> dict:
        with turn:
            return complete(run_model, request, default_max_tokens)

    return app


def check_port(host: str, port: int) -> None:
    """Say so now, on one line, when the address cannot be listened on."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise CfdpoError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another port") from None


def serve(run_dir: str | Path, host: str, port: int, trust_remote_code: bool, console) -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise CfdpoError(f"cfdpo serve needs {' and '.join(missing)}: pip install 'cfdpo[serve]'")
    import uvicorn

    check_port(host, port)
    run_model = load_run_model(run_dir, trust_remote_code)
    app = make_app(run_model, run_model.recipe.evaluation.max_new_tokens)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"note: listening on {host}: anyone who can reach it can use the model (no authentication)")
    console.print(f"serving {', '.join(run_model.names)} at http://{host}:{port}/v1 (Ctrl-C stops)", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info")
