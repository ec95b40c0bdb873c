"""`cfdpo export`: the hf dataset and model folders with their cards, the OpenRLHF and LLaMA-Factory files, bad inputs.

The run directory is made here without generation: answer rows written by hand go through the real
pair builder (`build_pairs` / `write_pairs`), and the adapter is a real PEFT LoRA adapter of the tiny
model. `card.validate()` posts the card to the Hub (`/api/validate-yaml`), so offline the cards are
checked by parsing them with `DatasetCard` / `ModelCard` and reading `card.data`, and the dataset
folder by loading it with `datasets.load_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

from cfdpo.cli import main
from cfdpo.export import sharegpt_pair
from cfdpo.pairs import build_pairs, load_pairs, pair_stats, write_pairs
from cfdpo.recipe import dump_recipe, parse_recipe
from cfdpo.runio import write_json
from cfdpo.scorers import make_scorer

SYSTEM = "You are a terse assistant."
PROMPTS = ["Name a colour.", "Say hello.", "Count to three."]
ANSWERS = {"control": "Plain answer {i}.", "treatment": "Plainest answer {i}.", "negative": "Arr matey, answer {i} ye!"}
INSTRUCTIONS = {"control": "", "treatment": "Answer plainly.\n\n", "negative": "Talk like a pirate.\n\n"}


def make_run(root: Path, model: Path) -> Path:
    """A run directory as `cfdpo run` leaves it: recipe, pairs (enc, negation), one adapter (negation), metrics."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    data = tiny_recipe(model, variants=["enc", "dis", "negation"])
    data["behaviour"]["system_prompt"] = SYSTEM
    recipe = parse_recipe(data)
    run = root / "run"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    rows = []
    for i, prompt in enumerate(PROMPTS):
        for cond, answer in ANSWERS.items():
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INSTRUCTIONS[cond] + prompt}]
            rows.append({"key": f"{cond}-{i}", "prompt_id": f"p{i}", "condition": cond, "sample": 0, "messages": messages,
                         "answer": answer.format(i=i)})
    scorer = make_scorer("lexicon", {"words": ["arr", "matey", "ahoy", "ye"]})
    for variant in recipe.variants:
        pairs = build_pairs(rows, variant, scorer, "lower") if variant != "dis" else []  # dis: as if a filter kept none
        stats = pair_stats(pairs, scorer, candidates=len(pairs) + 1)
        write_pairs(pairs, run / "pairs" / variant, {**stats, "variant": variant, "filter": False, "best_of_k": False})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model)
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(run / "adapters" / "negation")
    write_json(run / "adapters" / "negation" / "train_log.json", {
        "kind": "dpo", "pairs": 3, "train_runtime": 1.5, "spec": recipe.dpo.model_dump(mode="json"),
        "log_history": [{"loss": 0.69, "step": 1}, {"train_loss": 0.6543, "step": 1}]})
    (run / "adapters" / "negation" / "merged").mkdir()  # a --merge model: not part of the export
    (run / "adapters" / ".negation-work").mkdir()  # a checkpoint folder: not an adapter
    cell = {"score": 0.25, "mean_words": 4.0, "n": 3}
    write_json(run / "metrics.json", {
        "behaviour": {"name": "pirate", "scorer": "lexicon", "desired": "lower", "unit": "listed words per word"},
        "conditions": ["control", "negative"], "n_eval_prompts": 3,
        "models": {"base": {"control": cell, "negative": cell, "nll_ratio": 1.0},
                   "negation": {"control": cell, "negative": {**cell, "score": 0.125}, "nll_ratio": 1.04}}})
    return run


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export"), tiny_model)


def front_matter_and_body(readme: Path) -> tuple[dict, str]:
    _, meta, body = readme.read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(meta), body


def recipe_in(body: str) -> dict:
    return yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_hf_dataset_folder_loads_with_datasets_and_its_card_parses(run_dir, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    card = DatasetCard.load(out / "dataset" / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["task_categories"] == ["text-generation"]
    assert {"dpo", "counterfactual-dpo", "preference", "synthetic"} <= set(meta["tags"])
    files = {f["split"]: f["path"] for f in meta["configs"][0]["data_files"]}
    assert files == {v: f"data/{v}-00000-of-00001.parquet" for v in ("enc", "negation")}
    loaded = load_dataset(str(out / "dataset"), cache_dir=str(tmp_path / "cache"))
    for variant in ("enc", "negation"):
        assert (out / "dataset" / files[variant]).is_file()
        assert loaded[variant].to_list() == load_pairs(run_dir / "pairs" / variant).to_list()
    body = card.text
    assert "`Answer plainly.`" in body and "`Talk like a pirate.`" in body and SYSTEM in body
    stats = json.loads((run_dir / "pairs" / "negation" / "stats.json").read_text())
    assert f"| negative prompt | control answer | negative answer | ignore an inappropriate instruction | {stats['candidates']} | {stats['count']} |" in body
    assert "| (none) | Counterfactual DIS | control prompt | control answer | negative answer |" in body  # kept 0: no split
    assert "`lexicon` (listed words per word); **lower**" in body
    assert recipe_in(body) == yaml.safe_load((run_dir / "recipe.yaml").read_text())


def test_hf_model_folder_is_the_adapter_with_a_card(run_dir, tiny_model, tmp_path):
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out), "--base-model", "org/tiny", "--license", "apache-2.0"]) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["negation"]
    folder = out / "models" / "negation"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                        "train_log.json"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/tiny" and card.data.library_name == "peft" and card.data.license == "apache-2.0"
    assert {"dpo", "counterfactual-dpo", "lora"} <= set(card.data.tags)
    assert "| beta | 0.1 |" in card.text and "| lora_r | 4 |" in card.text and "| final training loss | 0.654 |" in card.text
    assert "| negation | 0.250 | 4.0 | 0.125 | 4.0 | 1.040 |" in card.text
    assert recipe_in(card.text) == yaml.safe_load((run_dir / "recipe.yaml").read_text())

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    exported = PeftModel.from_pretrained(base, folder).state_dict()
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir / "adapters" / "negation")
    lora = [k for k in exported if "lora_" in k]
    assert lora and all(torch.equal(exported[k], original.state_dict()[k]) for k in lora)


def test_hf_export_of_a_local_model_names_no_base_model(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    card = ModelCard.load(out / "models" / "negation" / "README.md")
    assert card.data.base_model is None and "pass `--base-model`" in card.text
    source = (run_dir / "adapters" / "negation" / "adapter_config.json").read_bytes()
    assert (out / "models" / "negation" / "adapter_config.json").read_bytes() == source


def test_openrlhf_lines_are_the_pairs_and_apply_chat_template_splits_them(run_dir, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out), "--format", "openrlhf"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["enc.jsonl", "negation.jsonl"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for variant in ("enc", "negation"):
        lines = [json.loads(line) for line in (out / f"{variant}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert lines == load_pairs(run_dir / "pairs" / variant).to_list()
        for row in lines:  # what OpenRLHF does with --prompt_key prompt --apply_chat_template
            prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            chosen = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)[len(prompt):]
            assert chosen.startswith(row["chosen"][0]["content"]) and SYSTEM in prompt


def test_llamafactory_sharegpt_files_and_dataset_info(run_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out), "--format", "llamafactory"]) == 0
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["cfdpo_negation"] == {
        "file_name": "negation.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"}}
    assert set(info) == {"cfdpo_enc", "cfdpo_negation"}  # dis kept no pairs
    rows = json.loads((out / "negation.json").read_text())
    pairs = load_pairs(run_dir / "pairs" / "negation").to_list()
    assert len(rows) == len(pairs) == 3
    first = rows[0]
    assert first["system"] == SYSTEM
    assert first["conversations"] == [{"from": "human", "value": "Talk like a pirate.\n\nName a colour."}]
    assert first["chosen"] == {"from": "gpt", "value": "Plain answer 0."}
    assert first["rejected"] == {"from": "gpt", "value": "Arr matey, answer 0 ye!"}


def test_sharegpt_pair_without_system_message_has_an_empty_system():
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}], "prompt_id": "p", "sample": 0}
    assert sharegpt_pair(row)["system"] == "" and sharegpt_pair(row)["conversations"] == [{"from": "human", "value": "q"}]


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(argv: list[str], fragment: str, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def bare_run(tmp_path: Path, run_dir: Path) -> Path:
    run = tmp_path / "bare"
    run.mkdir()
    (run / "recipe.yaml").write_bytes((run_dir / "recipe.yaml").read_bytes())
    return run


BAD = [
    ("out-not-empty", lambda t, r: ["export", str(r), "--out", str(t / "full")], "already exists and is not an empty folder"),
    ("out-is-a-file", lambda t, r: ["export", str(r), "--out", str(t / "full" / "keep.txt")], "already exists"),
    ("not-a-run-dir", lambda t, r: ["export", str(t / "full"), "--out", str(t / "new")], "not a run directory"),
    ("no-pairs", lambda t, r: ["export", str(bare_run(t, r)), "--out", str(t / "new")], "no pairs to export"),
    ("unknown-format", lambda t, r: ["export", str(r), "--out", str(t / "new"), "--format", "axolotl"],
     "--format 'axolotl': expected one of: hf, openrlhf, llamafactory"),
    ("push-other-format", lambda t, r: ["export", str(r), "--out", str(t / "new"), "-f", "openrlhf", "--push-to-hub", "u/x"],
     "uploads the hf format only"),
    ("bad-repo-id", lambda t, r: ["export", str(r), "--out", str(t / "new"), "--push-to-hub", "not a repo"],
     "expected a Hub repo id"),
    ("bad-base-model", lambda t, r: ["export", str(r), "--out", str(t / "new"), "--base-model", "/a/b/c"],
     "--base-model '/a/b/c'"),
    ("bad-license", lambda t, r: ["export", str(r), "--out", str(t / "new"), "--license", "My License"], "--license"),
]


@pytest.mark.parametrize("name,argv,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_export_input_is_refused_and_writes_nothing(name, argv, fragment, run_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    args = argv(tmp_path, run_dir)
    before, run_before = tree(tmp_path), tree(run_dir)
    refused(args, fragment, capsys)
    assert tree(tmp_path) == before and tree(run_dir) == run_before


def test_empty_out_folder_is_used(run_dir, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out"), "-f", "openrlhf"]) == 0
    assert (tmp_path / "out" / "enc.jsonl").is_file() and sorted(os.listdir(tmp_path)) == ["out"]


def test_push_with_the_hub_offline_keeps_the_export(run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = refused(["export", str(run_dir), "--out", str(tmp_path / "out"), "--push-to-hub", "user/pirate"],
                   "HF_HUB_OFFLINE is set", capsys)
    assert str(tmp_path / "out") in line
    assert (tmp_path / "out" / "dataset" / "README.md").is_file() and (tmp_path / "out" / "models" / "negation").is_dir()


def test_push_with_no_hub_answering_keeps_the_export(run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    refused(["export", str(run_dir), "--out", str(tmp_path / "out"), "--push-to-hub", "user/pirate"],
            "--push-to-hub user/pirate: upload failed", capsys)
    assert (tmp_path / "out" / "dataset" / "data" / "enc-00000-of-00001.parquet").is_file()
