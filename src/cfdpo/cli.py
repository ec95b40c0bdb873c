"""The `cfdpo` command line: the same functions as the Python API in `cfdpo.pipeline`."""

from __future__ import annotations

import os
import sys
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
    from cfdpo.pipeline import open_run

    return open_run(run_dir, recipe_path(recipe) if recipe else None)


@app.command()
def run(
    recipe: str = RecipeArg, out: Path = OutOpt,
    merge: bool = typer.Option(False, help="also save merged models"),
    sft: bool = typer.Option(False, help="also train the SFT context-distillation baseline"),
    resume: bool = typer.Option(True, help="reuse what the run directory already has (always safe: outputs are keyed)"),
):
    """Run the whole pipeline from one recipe: generate, pairs, train, evaluate, report."""
    from cfdpo.pipeline import run_all

    r = _open(out, recipe)
    path = run_all(r, merge=merge, sft=sft)
    console.print(f"[green]report:[/green] {path}")


@app.command()
def generate(run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt):
    """Answer control / treatment / negative prompts into answers.jsonl (cached, resumable)."""
    from cfdpo.pipeline import generate as gen

    n = gen(_open(run_dir, recipe))
    console.print(f"generated {n} new answers -> {run_dir / 'answers.jsonl'}")


@app.command()
def pairs(run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt):
    """Build ENC / DIS / Contrastive / Negation pairs into pairs/<variant>/."""
    from cfdpo.pipeline import build_pairs

    for v, s in build_pairs(_open(run_dir, recipe)).items():
        console.print(f"{v}: {s['count']} pairs (of {s['candidates']}) -> {run_dir / 'pairs' / v}")


@app.command()
def train(
    run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt,
    variant: Optional[list[str]] = typer.Option(None, "--variant", "-v", help="train only these variants"),
    merge: bool = typer.Option(False, help="also save a merged model under adapters/<variant>/merged"),
    sft: bool = typer.Option(False, help="also train the SFT context-distillation baseline"),
):
    """Train a LoRA adapter per variant with TRL's DPOTrainer into adapters/<variant>/."""
    from cfdpo.pipeline import train as tr

    for p in tr(_open(run_dir, recipe), variant or None, merge=merge, sft=sft):
        console.print(f"adapter -> {p}")


@app.command()
def evaluate(run_dir: Path = RunDirArg, recipe: Optional[str] = RecipeOpt):
    """Evaluate base, prompted and trained models on held-out prompts into metrics.json."""
    from cfdpo.pipeline import evaluate as ev

    ev(_open(run_dir, recipe))
    console.print(f"metrics -> {run_dir / 'metrics.json'}")


@app.command()
def report(run_dir: Path = RunDirArg):
    """Write report.md, report.html and plots from metrics.json."""
    from cfdpo.report import write_report

    console.print(f"report -> {write_report(run_dir)}")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory")):
    """Run the builtin pirate recipe (Instruction Negation and friends) on the embedded default model."""
    from cfdpo.pipeline import run_all

    path = run_all(_open(out, "pirate"))
    console.print(f"[green]report:[/green] {path}")


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
    pair_quality: Optional[list[str]] = typer.Option(None, help="RECIPE:VARIANT to compare plain / filtered / best-of-k pairs on (default pirate:negation, concise:enc)"),
    multi: Optional[list[str]] = typer.Option(None, help="RECIPE:VARIANT picks whose pairs train one adapter (default pirate:negation, concise:enc)"),
):
    """Run every recipe for several seeds (+ pair-quality and multi-behaviour runs) and write docs/RESULTS.md."""
    import shlex

    from cfdpo.benchmark import Sizes, make_plan, run_benchmark

    command = "cfdpo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else ""
    plan = make_plan([recipe_path(r) for r in recipes], seeds, out, docs, Sizes(train_size, eval_size, samples, mcq_items),
                     pair_quality, multi, command)
    run_benchmark(plan)
    console.print(f"[green]results:[/green] {docs / 'RESULTS.md'}")


def _error(message: str) -> None:
    """Print an error as one line; its text is never read as rich markup (it may hold [brackets])."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(' '.join(message.splitlines()))}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    try:
        app(args=argv, standalone_mode=False)
    except CfdpoError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"[red]error:[/red] {where}{e.strerror or e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 130
        raise
    return 0


def entry() -> None:
    sys.exit(main())
