"""Talk to a run's models: the base model and every trained adapter of a run directory, loaded once.

`load_run_model` puts every adapter under `adapters/` (safetensors only) on one PEFT model;
`RunModel.answer` replies to a conversation with one of them, `base` being the model with the
adapter disabled. `chat_loop` answers prompts line by line with one adapter, beside the base model with
`compare`. Each prompt is a new conversation built like the run's control prompts (the recipe's
system prompt and placement), the conversations the evaluation measures.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cfdpo import counterfactual
from cfdpo.backends.transformers import generate_answers  # the decode loop; one import site
from cfdpo.errors import CfdpoError
from cfdpo.generate import GenParams
from cfdpo.recipe import Recipe
from cfdpo.runtime import resolve_dtype

BASE = "base"
QUIT = "/quit"


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # the generated tokens (without the stop token) that `text` decodes


def read_run(run_dir: str | Path) -> tuple[Recipe, dict[str, Path]]:
    """The run's recipe and its trained adapters (in `variants.TRAINED_ORDER`), without loading a model."""
    from cfdpo.evaluate import find_adapters
    from cfdpo.pipeline import check_adapters
    from cfdpo.recipe import load_recipe

    d = Path(run_dir)
    if not (d / "recipe.yaml").is_file():
        raise CfdpoError(f"{d}: no recipe.yaml; expected a run directory made by `cfdpo run`")
    check_adapters(d / "adapters")
    return load_recipe(d / "recipe.yaml"), find_adapters(d)


def pick_adapter(names: list[str], wanted: str | None) -> str:
    """`wanted` if the run has it, else (None) the first trained adapter."""
    available = ", ".join([BASE, *names])
    if wanted is None:
        if not names:
            raise CfdpoError(f"no trained adapters in this run; choose --adapter base or run `cfdpo train` (available: {available})")
        return names[0]
    if wanted != BASE and wanted not in names:
        raise CfdpoError(f"--adapter '{wanted}': not in this run; available: {available}")
    return wanted


class RunModel:
    """One model in memory: the base model with every adapter of a run loaded on it."""

    def __init__(self, recipe: Recipe, model, tokenizer, adapters: list[str]):
        self.recipe = recipe
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters

    @property
    def names(self) -> list[str]:
        return [BASE, *self.adapters]

    def conversation(self, prompt: str) -> list[dict]:
        """A user prompt as the run's control conversation."""
        return counterfactual.messages(prompt, "control", self.recipe.behaviour)

    @contextmanager
    def using(self, name: str) -> Iterator:
        """The model with adapter `name` active (`base`: every adapter disabled)."""
        if name not in self.names:
            raise CfdpoError(f"model '{name}': not in this run; available: {', '.join(self.names)}")
        if not self.adapters:
            yield self.model
            return
        if name == BASE:
            context = self.model.disable_adapter()
        else:
            self.model.set_adapter(name)
            context = nullcontext()
        with context:
            yield self.model

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return ids["input_ids"] if isinstance(ids, dict) else list(ids)

    def answer(self, messages: list[dict], name: str, params: GenParams, seed: int = 0) -> Reply:
        return self.answers([messages], name, params, seed)[0]

    def answers(self, conversations: list[list[dict]], name: str, params: GenParams, seed: int = 0,
                batch_size: int = 1) -> list[Reply]:
        """One answer per conversation, `batch_size` conversations at a time."""
        got: dict[int, tuple[str, int]] = {}
        ids: dict[int, list[int]] = {}

        def keep(indices, answers, counts):
            got.update((i, (texts[0], tokens[0])) for i, texts, tokens in zip(indices, answers, counts))

        def keep_ids(indices, token_ids):
            ids.update((i, seqs[0]) for i, seqs in zip(indices, token_ids))

        with self.using(name) as model:
            generate_answers(model, self.tokenizer, conversations, params, [1] * len(conversations), batch_size, seed, keep,
                             on_ids=keep_ids)
        return [Reply(got[i][0], len(self.prompt_ids(c)), got[i][1], tuple(ids[i])) for i, c in enumerate(conversations)]


def load_run_model(run_dir: str | Path, trust_remote_code: bool = False) -> RunModel:
    """Load a run's base model (the recipe's model, its generation dtype) with every adapter on it."""
    from cfdpo import dist
    from cfdpo.models import check_available, load_model, load_tokenizer, resolve_model

    recipe, adapters = read_run(run_dir)
    if recipe.trust_remote_code and not trust_remote_code:
        raise CfdpoError("recipe asks for trust_remote_code: true, which runs Python code shipped with the model; "
                         "pass --trust-remote-code to allow it")
    path = resolve_model(recipe.model)
    check_available(path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    tokenizer.padding_side = "left"
    model = load_model(path, resolve_dtype(recipe.generation.dtype, purpose="evaluate"), trust_remote_code).to(dist.device())
    names = list(adapters)
    if names:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        model.eval()
    return RunModel(recipe, model, tokenizer, names)


def chat_loop(run_model: RunModel, adapter: str, compare: bool, params: GenParams, prompts: Iterable[str], out: Console,
         ask=None) -> int:
    """Answer each prompt (a line; `/quit` ends) with `adapter`, and with the base model beside it when
    `compare`. `ask` (a callable) shows the input prompt before each line, for a terminal. Returns the
    number of prompts answered."""
    answered = 0
    if ask:
        ask()
    for line in prompts:
        prompt = line.strip()
        if prompt == QUIT:
            break
        if prompt:
            show(run_model, adapter, compare, params, prompt, out)
            answered += 1
        if ask:
            ask()
    return answered


def show(run_model: RunModel, adapter: str, compare: bool, params: GenParams, prompt: str, out: Console) -> None:
    messages = run_model.conversation(prompt)
    text = run_model.answer(messages, adapter, params).text
    if not compare:
        out.file.write(text + "\n")  # as generated: no wrapping, no markup
        out.file.flush()
        return
    table = Table(show_lines=False, expand=True)
    table.add_column(adapter)
    table.add_column(BASE)
    table.add_row(Text(text), Text(run_model.answer(messages, BASE, params).text))
    out.print(table)
