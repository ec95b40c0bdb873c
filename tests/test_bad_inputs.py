"""The bad-input catalogue: every malformed input gets exit code 2, one line on stderr naming what is
wrong, no traceback, and leaves every file that was there (and the run directory) unchanged.

Each case builds its inputs in a fresh directory, hashes the whole tree, runs `cli.main([...])`
and hashes it again. The recipe loader is also fuzzed with hypothesis: any input gives either a
Recipe or a CfdpoError.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfdpo.cli import main
from cfdpo.errors import CfdpoError
from cfdpo.recipe import load_recipe, parse_recipe


@dataclass
class Case:
    dir: Path
    model: Path

    def recipe(self, data: dict | None = None, text: str | bytes | None = None, name: str = "r.yaml", **over) -> str:
        p = self.dir / name
        if text is not None:
            p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        else:
            p.write_text(yaml.safe_dump(data if data is not None else self.data(**over)), encoding="utf-8")
        return str(p)

    def data(self, **over) -> dict:
        d = tiny_recipe(self.model)
        for path, value in over.items():
            node = d
            keys = path.split("__")
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            if value is DROP:
                node.pop(keys[-1])
            else:
                node[keys[-1]] = value
        return d

    def prompts(self, text: str | bytes, name: str = "p.jsonl", **over) -> str:
        p = self.dir / name
        p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return self.recipe(prompts={"source": str(p), "train_size": 2, "eval_size": 1, **over})

    def run_dir(self, name: str = "run", **over) -> Path:
        """An existing run directory (recipe.yaml, manifest.json and one answer row)."""
        from cfdpo.pipeline import open_run

        d = self.dir / name
        open_run(d, self.recipe(name=f"{name}.yaml", **over))
        (d / "answers.jsonl").write_text(json.dumps({"key": "k1", "prompt_id": "p1", "answer": "hi"}) + "\n")
        return d


DROP = object()


def jsonl(*prompts) -> str:
    return "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)


def new_run(c: Case, **over) -> list[str]:
    return ["run", c.recipe(**over), "--out", str(c.dir / "out")]


CASES = [
    # --- the recipe file as YAML ---
    ("yaml-unclosed-bracket", "invalid YAML", lambda c: ["run", c.recipe(text="variants: [enc\n"), "--out", str(c.dir / "o")]),
    ("yaml-bad-indent", "invalid YAML", lambda c: ["run", c.recipe(text="a:\n  b: 1\n c: 2\n"), "--out", str(c.dir / "o")]),
    ("yaml-tab-indent", "invalid YAML", lambda c: ["run", c.recipe(text="a:\n\tb: 1\n"), "--out", str(c.dir / "o")]),
    ("yaml-top-level-list", "expected a mapping", lambda c: ["run", c.recipe(text="- enc\n- dis\n"), "--out", str(c.dir / "o")]),
    ("yaml-top-level-scalar", "expected a mapping", lambda c: ["run", c.recipe(text="hello\n"), "--out", str(c.dir / "o")]),
    ("yaml-empty-file", "expected a mapping", lambda c: ["run", c.recipe(text=""), "--out", str(c.dir / "o")]),
    ("yaml-non-utf8", "not valid UTF-8", lambda c: ["run", c.recipe(text=b"model: \xff\xfe\n"), "--out", str(c.dir / "o")]),
    ("yaml-utf16", "not valid UTF-8", lambda c: ["run", c.recipe(text="model: x\n".encode("utf-16")), "--out", str(c.dir / "o")]),
    ("yaml-python-tag", "invalid YAML", lambda c: ["run", c.recipe(text="model: !!python/object/apply:os.system ['true']\n"),
                                                    "--out", str(c.dir / "o")]),
    ("yaml-duplicate-key", "duplicate key 'model'", lambda c: ["run", c.recipe(text="model: a\nmodel: b\n"), "--out", str(c.dir / "o")]),
    ("yaml-deep-nesting", "nested too deeply", lambda c: ["run", c.recipe(text="a: " + "[" * 5000 + "]" * 5000 + "\n"),
                                                           "--out", str(c.dir / "o")]),
    ("lm-eval-unknown-task", "unknown lm-eval task 'no_such_task_xyz'", lambda c: [
        "run", c.recipe(evaluation__lm_eval={"tasks": ["no_such_task_xyz"]}), "--out", str(c.dir / "o")]),
    ("lm-eval-include-path-missing", "include_path: nowhere is not a folder", lambda c: [
        "run", c.recipe(evaluation__lm_eval={"tasks": ["x"], "include_path": "nowhere"}), "--out", str(c.dir / "o"),
        "--trust-remote-code"]),
    ("lm-eval-include-path-untrusted", "include_path, whose task files can run Python code", lambda c: (
        c.dir.joinpath("tasks").mkdir(), new_run(c, evaluation__lm_eval={"tasks": ["x"], "include_path": str(c.dir / "tasks")}))[-1]),
    ("lm-eval-no-tasks", "evaluation.lm_eval.tasks", lambda c: [
        "run", c.recipe(evaluation__lm_eval={"tasks": []}), "--out", str(c.dir / "o")]),
    ("recipe-missing", "recipe file not found", lambda c: ["run", str(c.dir / "none.yaml"), "--out", str(c.dir / "o")]),
    ("recipe-is-a-directory", "recipe file not found", lambda c: ["run", str(c.dir) + "/", "--out", str(c.dir / "o")]),
    ("recipe-unknown-builtin", "no such file or builtin recipe", lambda c: ["run", "nosuchrecipe", "--out", str(c.dir / "o")]),
    ("recipe-too-big", "at most 1000000 bytes", lambda c: ["run", c.recipe(text="# x\n" * 300_000), "--out", str(c.dir / "o")]),
    # --- wrong types ---
    ("type-variants-string", "variants: Input should be a valid list", lambda c: new_run(c, variants="enc")),
    ("type-behaviour-list", "behaviour: Input should be a valid dictionary", lambda c: new_run(c, behaviour=["x"])),
    ("type-beta-string", "dpo.beta: Input should be a valid number", lambda c: new_run(c, dpo__beta="high")),
    ("type-samples-float", "generation.samples: Input should be a valid integer", lambda c: new_run(c, generation__samples=2.5)),
    ("type-train-size-negative", "prompts.train_size: Input should be greater than or equal to 1",
     lambda c: new_run(c, prompts__train_size=-1)),
    ("type-trust-maybe", "trust_remote_code: Input should be a valid boolean", lambda c: new_run(c, trust_remote_code="maybe")),
    ("type-temperature-too-high", "generation.temperature", lambda c: new_run(c, generation__temperature=99)),
    ("type-lora-targets-empty", "dpo.lora_targets", lambda c: new_run(c, dpo__lora_targets=[])),
    ("type-behaviour-name-empty", "behaviour.name", lambda c: new_run(c, behaviour__name="")),
    ("behaviour-name-parent-path", "behaviour.name: '../x' is not a name", lambda c: new_run(c, behaviour__name="../x")),
    ("behaviour-name-absolute-path", "behaviour.name: '/tmp/x' is not a name", lambda c: new_run(c, behaviour__name="/tmp/x")),
    ("behaviour-name-leading-dot", "behaviour.name: '.x' is not a name", lambda c: new_run(c, behaviour__name=".x")),
    ("type-model-int", "model: Input should be a valid string", lambda c: new_run(c, model=123)),
    ("type-scorer-params-string", "behaviour.scorer.params", lambda c: new_run(c, behaviour__scorer__params="arr")),
    ("type-prompts-null", "prompts: Input should be a valid dictionary", lambda c: new_run(c, prompts=None)),
    ("type-save-steps-zero", "dpo.save_steps", lambda c: new_run(c, dpo__save_steps=0)),
    ("type-lexicon-words-int", "scorer 'lexicon'", lambda c: new_run(c, behaviour__scorer__params={"words": 5})),
    ("type-regex-bad-pattern", "invalid pattern", lambda c: new_run(
        c, behaviour__scorer={"name": "regex", "desired": "lower", "params": {"pattern": "(["}})),
    # --- missing fields ---
    ("missing-behaviour", "behaviour: field required", lambda c: new_run(c, behaviour=DROP)),
    ("missing-variants", "variants: field required", lambda c: new_run(c, variants=DROP)),
    ("missing-scorer", "behaviour.scorer: field required", lambda c: new_run(c, behaviour__scorer=DROP)),
    ("missing-scorer-desired", "behaviour.scorer.desired: field required", lambda c: new_run(c, behaviour__scorer__desired=DROP)),
    ("missing-behaviour-name", "behaviour.name: field required", lambda c: new_run(c, behaviour__name=DROP)),
    ("missing-both-instructions", "give a treatment instruction, a negative instruction, or both",
     lambda c: new_run(c, behaviour__treatment=DROP, behaviour__negative=DROP)),
    ("missing-lexicon-words", "missing parameter 'words'", lambda c: new_run(c, behaviour__scorer__params={})),
    # --- unknown fields ---
    ("unknown-top-level", "colour: unknown field; expected one of: model,", lambda c: new_run(c, colour="red")),
    ("unknown-dpo-field", "dpo.betta: unknown field; did you mean 'beta'?", lambda c: new_run(c, dpo__betta=0.1)),
    ("unknown-generation-field", "generation.temprature: unknown field; did you mean 'temperature'?",
     lambda c: new_run(c, generation__temprature=0.1)),
    ("unknown-us-spelling", "r.yaml: behavior: unknown field; did you mean 'behaviour'?", lambda c: [
        "run", c.recipe({("behavior" if k == "behaviour" else k): v for k, v in c.data().items()}), "--out", str(c.dir / "o")]),
    ("unknown-scorer-param", "unknown parameter 'colour'", lambda c: new_run(c, behaviour__scorer__params={"words": ["a"], "colour": 1})),
    # --- unknown variant / scorer / model, inconsistent recipe ---
    ("unknown-variant", "variants.0: Input should be 'enc', 'dis', 'contrastive' or 'negation'",
     lambda c: new_run(c, variants=["nope"])),
    ("repeated-variant", "variants must not repeat", lambda c: new_run(c, variants=["enc", "enc"])),
    ("variant-needs-treatment", "variant 'enc' needs behaviour.treatment",
     lambda c: new_run(c, variants=["enc"], behaviour__treatment=DROP)),
    ("unknown-scorer", "unknown scorer 'nope'", lambda c: new_run(c, behaviour__scorer__name="nope")),
    ("unknown-placement", "behaviour.placement", lambda c: new_run(c, behaviour__placement="middle")),
    ("system-placement-and-prompt", "placement 'system' replaces the system prompt",
     lambda c: new_run(c, behaviour__placement="system", behaviour__system_prompt="Be nice.")),
    ("unknown-model-alias", "model 'gpt-17': not found", lambda c: new_run(c, model="gpt-17")),
    ("model-path-missing", "not found", lambda c: new_run(c, model=str(c.dir / "no_model_here"))),
    ("model-dir-without-config", "directory has no config.json", lambda c: (c.dir.joinpath("m").mkdir(), new_run(c, model=str(c.dir / "m")))[1]),
    ("model-pickle-weights-only", "cfdpo loads weights only from safetensors", lambda c: (
        c.dir.joinpath("m").mkdir(), c.dir.joinpath("m", "config.json").write_text("{}"),
        c.dir.joinpath("m", "pytorch_model.bin").write_bytes(b"pickle"), new_run(c, model=str(c.dir / "m")))[-1]),
    ("model-gguf-missing", "GGUF file not found", lambda c: new_run(c, model=str(c.dir / "m.gguf"))),
    ("model-hub-id-offline", "not in the local Hugging Face cache", lambda c: new_run(c, model="nobody-here/no-such-model")),
    ("trust-remote-code-not-allowed", "pass --trust-remote-code", lambda c: new_run(c, trust_remote_code=True)),
    # --- prompt files ---
    ("prompts-empty-file", "no prompts found", lambda c: ["run", c.prompts(""), "--out", str(c.dir / "o")]),
    ("prompts-whitespace-file", "no prompts found", lambda c: ["run", c.prompts("\n   \n\t\n"), "--out", str(c.dir / "o")]),
    ("prompts-empty-prompt", "row 2: 'prompt' is empty", lambda c: ["run", c.prompts(jsonl("a?", "", "b?", "c?")), "--out", str(c.dir / "o")]),
    ("prompts-whitespace-prompt", "row 1: 'prompt' is empty", lambda c: ["run", c.prompts(jsonl("  \n\t ", "a?", "b?")),
                                                                          "--out", str(c.dir / "o")]),
    ("prompts-duplicated", "row 3 repeats the prompt of row 1", lambda c: ["run", c.prompts(jsonl("a?", "b?", " a? ", "c?")),
                                                                            "--out", str(c.dir / "o")]),
    ("prompts-very-long", "at most 20000", lambda c: ["run", c.prompts(jsonl("a?", "x" * 25_000, "b?")), "--out", str(c.dir / "o")]),
    ("prompts-non-utf8", "not valid UTF-8", lambda c: ["run", c.prompts(b'{"prompt": "caf\xe9"}\n'), "--out", str(c.dir / "o")]),
    ("prompts-csv-without-prompt-column", "has no 'prompt' field",
     lambda c: ["run", c.prompts("question,answer\nhi,there\nyo,man\n", name="p.csv"), "--out", str(c.dir / "o")]),
    ("prompts-csv-header-only", "no prompts found", lambda c: ["run", c.prompts("prompt\n", name="p.csv"), "--out", str(c.dir / "o")]),
    ("prompts-invalid-json-line", "line 2: invalid JSON", lambda c: ["run", c.prompts('{"prompt": "a?"}\n{"prompt": \n'),
                                                                      "--out", str(c.dir / "o")]),
    ("prompts-json-not-object", "line 1: expected a JSON object", lambda c: ["run", c.prompts("[1, 2]\n"), "--out", str(c.dir / "o")]),
    ("prompts-prompt-not-text", "'prompt' is int; expected text", lambda c: ["run", c.prompts('{"prompt": 5}\n'), "--out", str(c.dir / "o")]),
    ("prompts-unsupported-type", "unsupported prompt file type '.txt'", lambda c: ["run", c.prompts("a?\n", name="p.txt"),
                                                                                  "--out", str(c.dir / "o")]),
    ("prompts-file-missing", "no such file", lambda c: new_run(c, prompts={"source": str(c.dir / "none.jsonl")})),
    ("prompts-relative-file-missing", "/case/none.jsonl': not a builtin set", lambda c: new_run(c, prompts={"source": "none.jsonl"})),
    ("prompts-split-too-big", "train_size + eval_size = 3 but the set has only 2", lambda c: ["run", c.prompts(jsonl("a?", "b?")),
                                                                                             "--out", str(c.dir / "o")]),
    ("prompts-duplicate-ids", "ids are not unique", lambda c: ["run", c.prompts('{"id": 1, "prompt": "a?"}\n{"id": 1, "prompt": "b?"}\n'
                                                                                 '{"id": 2, "prompt": "c?"}\n'), "--out", str(c.dir / "o")]),
    ("prompts-garbage-parquet", "cannot read parquet", lambda c: ["run", c.prompts(b"PAR1 not really", name="p.parquet"),
                                                                   "--out", str(c.dir / "o")]),
    ("prompts-custom-column-missing", "row 1 has no 'question' field", lambda c: ["run", c.prompts(jsonl("a?", "b?", "c?"), column="question"),
                                                                                  "--out", str(c.dir / "o")]),
    # --- dpo.auto's validation split and guard, the scorecard's in-scope contexts (issue 15) ---
    # (the model is missing too in the last four: the recipe and its split are checked first, so a
    # missing check shows as the model's error, not as a whole run)
    ("dpo-max-kl-zero", "dpo.max_kl: Input should be greater than 0", lambda c: new_run(c, dpo__max_kl=0)),
    ("prompts-validation-not-smaller-than-train", "prompts.validation_size: 2 is not smaller than train_size (2)",
     lambda c: new_run(c, model=str(c.dir / "no_model_here"), prompts={"train_size": 2, "eval_size": 1, "validation_size": 2})),
    ("prompts-validation-more-than-the-set", "prompts.validation_size: train_size + eval_size + validation_size = 4 "
     "but the set has only 3 prompts", lambda c: (c.prompts(jsonl("a?", "b?", "c?")), new_run(
         c, model=str(c.dir / "no_model_here"),
         prompts={"source": str(c.dir / "p.jsonl"), "train_size": 2, "eval_size": 1, "validation_size": 1}))[1]),
    ("in-scope-prompts-are-the-control-prompts", "evaluation.in_scope.0 ('own'): prompts 'general' are the recipe's own "
     "prompts", lambda c: new_run(c, model=str(c.dir / "no_model_here"),
                                  evaluation__in_scope=[{"name": "own", "prompts": "general"}])),
    ("in-scope-system-prompt-is-the-deployment's", "evaluation.in_scope.0 ('same'): system_prompt is "
     "behaviour.system_prompt, the control condition", lambda c: new_run(
         c, model=str(c.dir / "no_model_here"), behaviour__system_prompt="You are a helpful assistant.",
         evaluation__in_scope=[{"name": "same", "system_prompt": "You are a  helpful assistant."}])),
    # --- run directories ---
    ("rundir-of-another-recipe", "written by another recipe (differs in: dpo)",
     lambda c: (c.run_dir(), ["run", c.recipe(dpo__beta=0.5), "--out", str(c.dir / "run")])[1]),
    ("probe-rundir-of-another-recipe", "written by another recipe (differs in: behaviour)",
     lambda c: (c.run_dir(), ["probe", c.recipe(behaviour__treatment="Answer briefly."), "--out", str(c.dir / "run")])[1]),
    ("rundir-is-a-file", "exists and is not a directory", lambda c: (c.dir.joinpath("f").write_text("x"),
                                                                     ["run", c.recipe(), "--out", str(c.dir / "f")])[1]),
    ("rundir-parent-is-a-file", "output directory is not writable (Not a directory)",
     lambda c: (c.dir.joinpath("f").write_text("x"), ["run", c.recipe(), "--out", str(c.dir / "f" / "run")])[1]),
    ("rundir-without-recipe", "no recipe.yaml in the run directory", lambda c: ["generate", str(c.dir / "empty")]),
    ("rundir-recipe-corrupt", "invalid YAML", lambda c: (c.run_dir(), c.dir.joinpath("run", "recipe.yaml").write_text("a: [\n"),
                                                         ["generate", str(c.dir / "run")])[-1]),
    ("rundir-manifest-corrupt", "manifest.json: not valid JSON", lambda c: (
        c.run_dir(), c.dir.joinpath("run", "manifest.json").write_text("{"), ["generate", str(c.dir / "run")])[-1]),
    ("rundir-prompt-file-edited", "the prompt file changed since this run started", lambda c: (
        c.prompts(jsonl("a?", "b?", "c?")), c.run_dir(prompts={"source": str(c.dir / "p.jsonl"), "train_size": 2, "eval_size": 1}),
        c.dir.joinpath("p.jsonl").write_text(jsonl("a?", "b?", "d?")), ["generate", str(c.dir / "run")])[-1]),
    ("rundir-no-resume-with-results", "already has results (answers.jsonl) and --no-resume was given",
     lambda c: (c.run_dir(), ["run", str(c.dir / "run.yaml"), "--out", str(c.dir / "run"), "--no-resume"])[1]),
    ("rundir-answers-corrupt-in-the-middle", "corrupt row in the middle of the file", lambda c: (
        c.run_dir(), c.dir.joinpath("run", "answers.jsonl").write_text('{"key": "a"}\nnot json\n{"key": "b"}\n'),
        ["pairs", str(c.dir / "run")])[-1]),
    ("rundir-train-before-pairs", "no pairs dataset here; run `cfdpo pairs` first",
     lambda c: (c.run_dir(), ["train", str(c.dir / "run")])[1]),
    ("rundir-train-unknown-variant", "variant 'nope' is not in this recipe's variants",
     lambda c: (c.run_dir(), ["train", str(c.dir / "run"), "-v", "nope"])[1]),
    ("rundir-train-sft-without-treatment-variant", "the SFT baseline needs",
     lambda c: (c.run_dir(variants=["dis"]), ["train", str(c.dir / "run"), "--sft"])[1]),
    ("rundir-adapter-pickle-only", "no adapter_model.safetensors", lambda c: (
        c.run_dir(), c.dir.joinpath("run", "adapters", "enc").mkdir(parents=True),
        c.dir.joinpath("run", "adapters", "enc", "adapter_config.json").write_text("{}"),
        c.dir.joinpath("run", "adapters", "enc", "adapter_model.bin").write_bytes(b"pickle"), ["evaluate", str(c.dir / "run")])[-1]),
    ("rundir-pairs-damaged", "cannot read the pairs dataset", lambda c: (
        c.run_dir(variants=["negation"]), c.dir.joinpath("run", "pairs", "negation").mkdir(parents=True),
        c.dir.joinpath("run", "pairs", "negation", "state.json").write_text("{"), ["train", str(c.dir / "run")])[-1]),
    ("report-without-metrics", "metrics.json: not found", lambda c: ["report", str(c.run_dir())]),
    ("report-metrics-not-json", "metrics.json: not valid JSON", lambda c: (
        c.run_dir(), c.dir.joinpath("run", "metrics.json").write_text("{nope"), ["report", str(c.dir / "run")])[-1]),
    ("report-metrics-wrong-shape", "not the metrics cfdpo writes", lambda c: (
        c.run_dir(), c.dir.joinpath("run", "metrics.json").write_text('{"models": []}'), ["report", str(c.dir / "run")])[-1]),
    # --- paths outside the run directory ---
    ("outside-answers-symlink", "outside the run directory", lambda c: (
        c.run_dir(), c.dir.joinpath("elsewhere.jsonl").write_text(""), c.dir.joinpath("run", "answers.jsonl").unlink(),
        c.dir.joinpath("run", "answers.jsonl").symlink_to(c.dir / "elsewhere.jsonl"), ["generate", str(c.dir / "run")])[-1]),
    ("outside-pairs-dir-symlink", "outside the run directory", lambda c: (
        c.run_dir(), c.dir.joinpath("elsewhere").mkdir(), c.dir.joinpath("run", "pairs").symlink_to(c.dir / "elsewhere"),
        ["pairs", str(c.dir / "run")])[-1]),
    ("outside-report-symlink", "outside the run directory", lambda c: (
        c.run_dir(), c.dir.joinpath("run", "report.html").symlink_to("/etc/hostname"), ["generate", str(c.dir / "run")])[-1]),
    ("outside-plots-dir-symlink-on-report", "outside the run directory", lambda c: (
        c.run_dir(), c.dir.joinpath("elsewhere").mkdir(), c.dir.joinpath("run", "metrics.json").write_text("{}"),
        c.dir.joinpath("run", "plots").symlink_to(c.dir / "elsewhere"), ["report", str(c.dir / "run")])[-1]),
    # --- the command line itself ---
    ("cli-unknown-command", "No such command 'frobnicate'", lambda c: ["frobnicate"]),
    ("cli-missing-argument", "Missing argument", lambda c: ["generate"]),
    ("cli-unknown-option", "No such option: --bogus", lambda c: ["run", c.recipe(), "--out", str(c.dir / "o"), "--bogus"]),
]


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_refused(argv: list[str], fragment: str, capsys, *roots: Path) -> str:
    before = [tree_digest(r) for r in roots]
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err + captured.out
    assert [tree_digest(r) for r in roots] == before, "a refused command changed files"
    return lines[0]


def test_catalogue_is_big_enough():
    assert len(CASES) >= 50
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,fragment,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(name, fragment, setup, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path / "case", tiny_model)
    case.dir.mkdir()
    argv = setup(case)
    check_refused(argv, fragment, capsys, case.dir, tiny_model)


def test_read_only_output_directory(tiny_model, tmp_path, capsys):
    """An output directory nothing can write to (root ignores chmod, so it is made immutable)."""
    case = Case(tmp_path / "case", tiny_model)
    case.dir.mkdir()
    ro = case.dir / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("running as root and `chattr +i` is not available here, so no directory can be made read-only")
    try:
        if os.access(ro, os.W_OK) and os.geteuid() != 0:
            pytest.skip("cannot make a read-only directory here")
        check_refused(["run", case.recipe(), "--out", str(ro / "run")], "output directory is not writable", capsys, case.dir)
        check_refused(["run", case.recipe(), "--out", str(ro)], "output directory is not writable", capsys, case.dir)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], check=False)
        ro.chmod(0o755)


def test_trust_remote_code_flag_is_the_consent(tiny_model, tmp_path, capsys):
    """With --trust-remote-code the recipe's request is honoured; the flag is recorded nowhere it could leak."""
    case = Case(tmp_path / "case", tiny_model)
    case.dir.mkdir()
    from cfdpo.pipeline import open_run

    r = case.recipe(trust_remote_code=True)
    with pytest.raises(CfdpoError, match="pass --trust-remote-code"):
        open_run(case.dir / "run", r)
    run = open_run(case.dir / "run", r, trust_remote_code=True)
    assert run.recipe.trust_remote_code is True
    run = open_run(case.dir / "run", None, trust_remote_code=None)  # a stage that loads no model
    assert run.recipe.trust_remote_code is False
    plain = open_run(case.dir / "run2", case.recipe(name="plain.yaml"))
    assert plain.recipe.trust_remote_code is False


# --- fuzzing the recipe loader ---

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["model", "trust_remote_code", "behaviour", "prompts", "generation", "variants", "pairs", "dpo", "evaluation",
          "behaviour.name", "behaviour.treatment", "behaviour.negative", "behaviour.placement", "behaviour.system_prompt",
          "behaviour.scorer", "behaviour.scorer.name", "behaviour.scorer.params", "behaviour.scorer.desired",
          "prompts.source", "prompts.train_size", "generation.samples", "generation.temperature", "dpo.beta",
          "dpo.loss_type", "dpo.lora_targets", "evaluation.samples"]
SCORER_NAMES = st.sampled_from(["lexicon", "regex", "length", "language", "nope"])
VALID = {
    "behaviour": {"name": "b", "negative": "Talk like a pirate.", "treatment": "Be plain.",
                  "scorer": {"name": "lexicon", "desired": "lower", "params": {"words": ["arr"]}}},
    "variants": ["negation", "enc"],
}


def _accepts(data) -> None:
    try:
        r = parse_recipe(data, "fuzz.yaml")
    except CfdpoError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.yaml")
        return
    r.canonical_json()
    r.needed_conditions()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_fuzz_parse_recipe_any_data(data):
    _accepts(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), json_like | SCORER_NAMES), min_size=1, max_size=3))
def test_fuzz_parse_recipe_mutated_valid(mutations):
    data = copy.deepcopy(VALID)
    for path, value in mutations:
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    _accepts(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | json_like.map(lambda d: yaml.safe_dump(d).encode()))
def test_fuzz_load_recipe_any_bytes(tmp_path, raw):
    p = tmp_path / "fuzz.yaml"
    p.write_bytes(raw)
    try:
        load_recipe(p)
    except CfdpoError as e:
        assert "\n" not in str(e)
