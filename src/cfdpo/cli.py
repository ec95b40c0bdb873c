"""The `cfdpo` command line: the same functions as the Python API in `cfdpo.pipeline`."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cfdpo.errors import CfdpoError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Counterfactual DPO: align a model's behaviour with no human preference labels.",
)
console = Console(stderr=True)

RecipeArg = typer.Argument(..., help="recipe YAML file, or the name of a builtin recipe (pirate, concise, ...)")
OutOpt = typer.Option(..., "--out", "-o", help="run directory")
RunDirArg = typer.Argument(..., help="run directory (made by `cfdpo run` or a stage with --recipe)")
RecipeOpt = typer.Option(None, "--recipe", "-r", help="recipe for a new run directory")


def builtin_recipes() -> dict[str, Path]:
    from importlib import resources

    roots = [Path(__file__).resolve().parents[2] / "recipes", Path(str(resources.files("cfdpo") / "data" / "recipes"))]
    found: dict[str, Path] = {}
    for root in roots:
        if root.is_dir():
            for p in sorted(root.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found


def recipe_path(value: str) -> Path:
    p = Path(value)
    if p.is_file() or value.endswith((".yaml", ".yml")) or os.sep in value:
        return p
    known = builtin_recipes()
    if value in known:
        return known[value]
    raise CfdpoError(f"recipe '{value}': no such file or builtin recipe; builtin: {', '.join(known) or 'none'}")


def _open(run_dir: Path, recipe: Optional[str]):
    return _open_with(run_dir, recipe, None)


TrustOpt = typer.Option(
    False, "--trust-remote-code",
    help="allow the model's own Python code to run (needed when the recipe sets trust_remote_code: true)",
)


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def _open_with(run_dir: Path, recipe: Optional[str], trust: bool | None, resume: bool = True):
    from cfdpo.pipeline import open_run

    r = open_run(run_dir, recipe_path(recipe) if recipe else None, trust_remote_code=trust, resume=resume)
    if trust:
        console.print("note: --trust-remote-code: the model's own code may run", highlight=False)
    return r


@app.command()
def run(
    recipe: str = RecipeArg, out: Path = OutOpt,
    merge: bool = typer.Option(False, help="also save merged models"),
    sft: bool = typer.Option(False, help="also train the SFT context-distillation baseline"),
    resume: bool = typer.Option(
        True, help="continue a run directory that has results (answers, checkpoints and adapters are reused); "
        "--no-resume refuses such a directory"),
    trust_remote_code: bool = TrustOpt,
):
    """Run the whole pipeline from one recipe: generate, pairs, train, evaluate, report."""
    from cfdpo.pipeline import run_all

    r = _open_with(out, recipe, trust_remote_code, resume)
    path = run_all(r, merge=merge, sft=sft, warn=_warn)
    console.print(f"[green]report:[/green] {path}")


@app.command()
def generate(run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt, trust_remote_code: bool = TrustOpt):
    """Answer control / treatment / negative prompts into answers.jsonl (cached, resumable)."""
    from cfdpo.pipeline import generate as gen

    n = gen(_open_with(run_dir, recipe, trust_remote_code))
    console.print(f"generated {n} new answers -> {run_dir / 'answers.jsonl'}")


@app.command()
def probe(recipe: str = RecipeArg, out: Path = OutOpt, trust_remote_code: bool = TrustOpt):
    """Before training: answer the training prompts as the recipe asks and show whether its instructions move
    the behaviour score (each condition, the teacher against the answers as asked, and each variant's
    chosen-minus-rejected signal, with 95 % intervals over prompts) into probe.json; `cfdpo run` with the
    same --out reuses the answers."""
    from cfdpo.pipeline import probe_run
    from cfdpo.probe import probe_lines

    result = probe_run(_open_with(out, recipe, trust_remote_code))
    stdout = Console(highlight=False, soft_wrap=True)  # the probe is the command's output; progress goes to stderr
    for line in probe_lines(result, result["unit"]):
        stdout.print(line)


@app.command()
def pairs(run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt):
    """Build ENC / DIS / Contrastive / Negation pairs into pairs/<variant>/."""
    from cfdpo.pairs import weak_signal
    from cfdpo.pipeline import build_pairs

    for v, s in build_pairs(_open(run_dir, recipe)).items():
        console.print(f"{v}: {s['count']} pairs (of {s['candidates']}) -> {run_dir / 'pairs' / v}")
        message = weak_signal(v, s)
        if message:
            _warn(message)


@app.command()
def train(
    run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt,
    variant: Optional[list[str]] = typer.Option(None, "--variant", "-v", help="train only these variants"),
    merge: bool = typer.Option(False, help="also save a merged model under adapters/<variant>/merged"),
    sft: bool = typer.Option(False, help="also train the SFT context-distillation baseline"),
    trust_remote_code: bool = TrustOpt,
):
    """Train a LoRA adapter per variant with TRL's DPOTrainer into adapters/<variant>/ (with dpo.rounds > 1:
    the on-policy rounds, each answering again with the previous round's adapter, into rounds/)."""
    from cfdpo.pipeline import train as tr

    for p in tr(_open_with(run_dir, recipe, trust_remote_code), variant or None, merge=merge, sft=sft):
        console.print(f"adapter -> {p}")


@app.command()
def evaluate(run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt, trust_remote_code: bool = TrustOpt):
    """Evaluate base, prompted and trained models on held-out prompts into metrics.json."""
    from cfdpo.pipeline import evaluate as ev

    ev(_open_with(run_dir, recipe, trust_remote_code))
    console.print(f"metrics -> {run_dir / 'metrics.json'}")


@app.command()
def report(run_dir: Path = RunDirArg):
    """Write report.md, report.html and plots from metrics.json."""
    from cfdpo.dist import on_main
    from cfdpo.report import write_report

    console.print(f"report -> {on_main(lambda: _holding(run_dir, write_report))}")


def _holding(run_dir: Path, write):
    """`write(run_dir)` while holding the run directory's lock (a missing directory is left to `write` to refuse)."""
    from contextlib import nullcontext

    from cfdpo.lock import hold

    with hold(run_dir) if run_dir.is_dir() else nullcontext():
        return write(run_dir)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory")):
    """Run the builtin pirate recipe (Instruction Negation and friends) on the embedded default model."""
    from cfdpo.pipeline import run_all

    path = run_all(_open(out, "pirate"), warn=_warn)
    console.print(f"[green]report:[/green] {path}")


@app.command("recipe")
def recipe_fields(schema: bool = typer.Option(False, "--schema", help="print the recipe's JSON Schema instead")):
    """Print every recipe field with its default and what it does, as a commented YAML template."""
    import json

    from cfdpo.recipe import recipe_schema, recipe_template

    typer.echo(json.dumps(recipe_schema(), indent=2) if schema else recipe_template(), nl=schema)


@app.command()
def export(
    run_dir: Path = RunDirArg,
    out: Path = typer.Option(..., "--out", "-o", help="folder to write; it must not exist or be empty"),
    fmt: str = typer.Option("hf", "--format", "-f", help="hf (parquet dataset + adapters, with cards), "
                                                         "openrlhf (JSONL) or llamafactory (sharegpt JSON + dataset_info.json)"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO_ID",
                                              help="then upload (hf format): the pairs to the dataset repo REPO_ID, "
                                                   "each adapter to the model repo REPO_ID-<adapter>"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id of the base model, for the model cards "
                                                                       "and adapter configs (default: the recipe's model "
                                                                       "when it is a Hub id)"),
    license_id: str = typer.Option("other", "--license", help="license id in the cards' metadata (e.g. apache-2.0)"),
):
    """Publish a run's pairs and adapters: Hub dataset and model folders (hf), or OpenRLHF / LLaMA-Factory files."""
    from cfdpo.export import export_run

    path = export_run(run_dir, out, fmt, push_to_hub, base_model, license_id)
    console.print(f"export ({fmt}) -> {path}" + (f"; uploaded to {push_to_hub}" if push_to_hub else ""))


@app.command()
def scorers():
    """List the scorers a recipe can name: the builtin ones and those installed as plugins (entry points cfdpo.scorers)."""
    from cfdpo.scorers import list_scorers

    found = list_scorers()
    head = ("name", "unit", "source", "description")
    rows = [head, *((s.name, s.unit, s.source, s.description) for s in found)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[3])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="accelerate config: ddp, zero2, zero3, fsdp (shipped) or a YAML file"),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", "-n", help="override the config's num_processes"),
):
    """Run a cfdpo command on several GPUs with `accelerate launch`: cfdpo launch ddp run RECIPE --out DIR."""
    import subprocess

    from cfdpo.dist import accelerate_config

    path, cfg = accelerate_config(config)
    if not ctx.args:
        raise CfdpoError("launch: give the cfdpo command to run, e.g. `cfdpo launch ddp run RECIPE --out DIR`")
    n = num_processes or cfg.get("num_processes", 1)
    if n < 1:
        raise CfdpoError(f"--num-processes: expected a positive integer, got {n}")
    if cfg["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP") and not cfg.get("use_cpu"):
        import torch

        gpus = torch.cuda.device_count()
        if gpus < n:
            raise CfdpoError(f"{path}: asks for {n} GPU processes but this machine has {gpus} GPUs; "
                             f"pass --num-processes {gpus}" if gpus else f"{path}: needs GPUs and this machine has none")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "--num_processes", str(n),
           "-m", "cfdpo", *ctx.args]
    raise SystemExit(subprocess.call(cmd))


@app.command()
def benchmark(
    recipes: list[str] = typer.Argument(..., help="recipe files or builtin recipe names"),
    seeds: int = typer.Option(3, help="seeds per recipe (generation sampling and training)"),
    out: Path = typer.Option(Path("runs/benchmark"), "--out", "-o", help="directory for every run"),
    docs: Path = typer.Option(Path("docs"), help="where RESULTS.md and the plots go"),
    train_size: Optional[int] = typer.Option(None, help="override every recipe's prompts.train_size"),
    eval_size: Optional[int] = typer.Option(None, help="override every recipe's prompts.eval_size"),
    samples: Optional[int] = typer.Option(None, help="samples per condition (k of best-of-k) for the pair-quality recipes"),
    mcq_items: Optional[int] = typer.Option(None, help="multiple-choice items (default: the recipe's, 179)"),
    pair_quality: Optional[list[str]] = typer.Option(None, help="RECIPE:VARIANT to compare plain / filtered / best-of-k pairs on (default pirate:negation, concise:enc; none: no such runs)"),
    multi: Optional[list[str]] = typer.Option(None, help="RECIPE:VARIANT picks whose pairs train one adapter (default pirate:negation, concise:enc; none: no such run)"),
    methods: Optional[list[str]] = typer.Option(None, help="RECIPE:VARIANT to compare methods on: the steering baseline, "
                                                           "self-reward pairs and 3 on-policy rounds beside plain DPO (default: none)"),
    targets: Optional[Path] = typer.Option(None, help="target rules (YAML) for RESULTS.md's Targets table, format in src/cfdpo/benchmark/targets.py "
                                                      "(default: ./bench/targets.yaml when it exists, as in the cfdpo repository; else none)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="[RECIPE:]SECTION.FIELD=VALUE for every run of every recipe "
                                                                 "(of RECIPE only), VALUE read as YAML (e.g. dpo.auto=true, "
                                                                 "concise:dpo.beta=0.2); repeatable"),
):
    """Run every recipe for several seeds (+ pair-quality, method and multi-behaviour runs) and write docs/RESULTS.md."""
    import shlex

    from cfdpo.benchmark.plan import Sizes, make_plan
    from cfdpo.benchmark.runner import run_benchmark
    from cfdpo.dist import on_main
    from cfdpo.lock import hold

    command = "cfdpo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else ""
    plan = make_plan([recipe_path(r) for r in recipes], seeds, out, docs, Sizes(train_size, eval_size, samples, mcq_items),
                     pair_quality, multi, command, targets, methods, set_)
    out.mkdir(parents=True, exist_ok=True)
    with on_main(lambda: hold(out)):  # one benchmark per --out
        run_benchmark(plan)
    console.print(f"[green]results:[/green] {docs / 'RESULTS.md'}")


@app.command()
def chat(
    run_dir: Path = typer.Argument(..., help="run directory with trained adapters"),
    adapter: Optional[str] = typer.Option(None, help="adapter to talk to, or base (default: the first trained one)"),
    compare: bool = typer.Option(False, "--compare", help="show the base model's answer beside the adapter's"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="answer this one prompt and exit"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="answer length cap (default: the recipe's evaluation.max_new_tokens)"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 answers greedily"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass when temperature > 0, in (0, 1]"),
    trust_remote_code: bool = TrustOpt,
):
    """Talk to a run's aligned model: one line is one prompt (a new conversation); /quit or end of input stops."""
    from cfdpo.chat import BASE, GenParams, chat_loop, load_run_model, pick_adapter, read_run, show

    if not 0.0 < top_p <= 1.0:
        raise CfdpoError(f"--top-p: expected a number in (0, 1], got {top_p}")
    recipe, adapters = read_run(run_dir)
    name = pick_adapter(list(adapters), adapter)
    if compare and name == BASE:
        raise CfdpoError("--compare: shows an adapter beside the base model; choose an adapter with --adapter")
    params = GenParams(max_new_tokens or recipe.evaluation.max_new_tokens, temperature, top_p)
    run_model = load_run_model(run_dir, trust_remote_code)
    out = Console(highlight=False)
    if prompt is not None:
        show(run_model, name, compare, params, prompt, out)
        return
    ask = (lambda: console.print(f"[bold]{name}>[/bold] ", end="")) if sys.stdin.isatty() else None
    if ask:
        console.print(f"talking to {name}{' and ' + BASE if compare else ''}; {'/quit'} or Ctrl-D ends")
    chat_loop(run_model, name, compare, params, sys.stdin, out, ask)


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="run directory with trained adapters"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (anything but localhost exposes the model, with no authentication)"),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port"),
    trust_remote_code: bool = TrustOpt,
):
    """Serve the base model and every adapter behind an OpenAI-compatible API (/v1/models, /v1/chat/completions)."""
    from cfdpo.serve import serve as run_server

    run_server(run_dir, host, port, trust_remote_code, console)


def _error(message: str) -> None:
    """Print an error as one line; its text is never read as rich markup (it may hold [brackets])."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(' '.join(message.splitlines()))}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """The CLI: the exit code of one command (0 done, 2 bad input, 1 the machine or a bug, 130 interrupted)."""
    from cfdpo import dist

    code = _main(argv)
    dist.finish(clean=code == 0)
    return code


def _main(argv: list[str] | None) -> int:
    from cfdpo.runtime import configure_openmp

    configure_openmp()  # before anything imports torch
    from cfdpo import dist

    if not dist.is_main():
        console.quiet = True  # rank 0 speaks for all
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    started = time.monotonic()
    try:
        app(args=argv, standalone_mode=False)
    except CfdpoError as e:
        if not isinstance(e, dist.MainProcessError):  # rank 0's own errors are printed by rank 0
            console.quiet = False
            where = f"rank {dist.rank()}: " if not dist.is_main() else ""
            _error(f"{where}{e}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - every failure ends as one line and an exit code
        kinds = {k.__name__ for k in type(e).__mro__}
        if "ClickException" in kinds:  # usage errors (typer >= 0.20 vendors click, so match by name): one line too
            hint = " (see cfdpo --help)" if "UsageError" in kinds else ""
            _error(f"{e.format_message()}{hint}")
            return 2
        if "Abort" in kinds:
            return 130
        if isinstance(e, OSError) and e.errno in USER_ERRNOS:  # a path the user named
            where = f"{e.filename}: " if e.filename else ""
            _error(f"{where}{e.strerror or e}")
            return 2
        console.quiet = False
        where = f"rank {dist.rank()}: " if not dist.is_main() else ""
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "cfdpo")
        _error(where + _environment_error(e, command, started))
        return 1
    return 0


# errno values of a path the user named (a missing input file, a file where a directory belongs);
# None: a library's own OSError about its input (a model it cannot find). Every other OSError is the machine's.
USER_ERRNOS = {None, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def _environment_error(e: Exception, command: str, started: float) -> str:
    """The one line for a failure of the machine (disk, memory, permissions) or of cfdpo itself; the traceback goes to a log."""
    log = _save_traceback(e, command, started)
    name = getattr(e, "filename", None)
    number = getattr(e, "errno", None)
    if number in (errno.ENOSPC, errno.EDQUOT):
        what = f"disk full{f' while writing {name}' if name else ''}: free space and rerun the same command to resume"
    elif number in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = (f"permission denied{f' on {name}' if name else ''} ({e.strerror}): "
                "make it writable and rerun the same command to resume")
    elif isinstance(e, MemoryError) or "OutOfMemoryError" in {k.__name__ for k in type(e).__mro__}:
        what = "out of memory: free memory or lower the batch sizes, then rerun the same command to resume"
    elif isinstance(e, OSError):
        what = f"{e.strerror or e}{f' on {name}' if name else ''}: a problem of this machine; fix it and rerun the same command to resume"
    else:
        what = f"unexpected {type(e).__name__}: {str(e)[:300]}; this is a bug in cfdpo or a problem of this machine"
    return f"{what} (traceback: {log})"


def _save_traceback(e: Exception, command: str, started: float) -> str:
    """Write the traceback to RUN_DIR/logs/ (the run directory this command locked), else to a temporary file; returns where."""
    import tempfile
    import traceback

    from cfdpo.lock import held_dir

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    stem = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{''.join(c for c in command if c.isalnum() or c in '-_')}"
    run_dir = held_dir(since=started)
    if run_dir is not None:
        path = run_dir / "logs" / f"{stem}.log"
        try:
            path.parent.mkdir(exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return str(path)
        except OSError:
            pass
    try:
        fd, name = tempfile.mkstemp(prefix=f"cfdpo-{stem}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return name
    except OSError as err:
        sys.stderr.write(text)
        return f"not saved ({err.strerror}), printed above"


def entry() -> None:
    sys.exit(main())
