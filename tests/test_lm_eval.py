"""lm-eval tasks beside cfdpo's own evaluation, offline, with a task defined in a local YAML file."""

from __future__ import annotations

import json

from conftest import tiny_recipe, write_recipe

from cfdpo.likelihood import load_mcq


def test_lm_eval_task_runs_for_every_model_and_agrees_with_builtin_mcq(tiny_model, tmp_path):
    from cfdpo.cli import main

    items = load_mcq(12)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    (tasks / "local_mcq.yaml").write_text(
        "task: cfdpo_local_mcq\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tiny_model, variants=["negation"],
        evaluation={"max_new_tokens": 4, "batch_size": 8, "mcq": True, "mcq_items": 12,
                    "lm_eval": {"tasks": ["cfdpo_local_mcq"], "include_path": str(tasks)}}))
    run = tmp_path / "run"
    trust = "--trust-remote-code"  # lm-eval task files may import Python: include_path needs it
    assert main(["generate", str(run), "--recipe", str(rec), trust]) == 0
    assert main(["evaluate", str(run), trust]) == 0
    models = json.loads((run / "metrics.json").read_text())["models"]
    assert set(models) == {"base", "prompted"}
    for m in models.values():
        acc = m["lm_eval"]["cfdpo_local_mcq"]["acc"]
        assert 0.0 <= acc <= 1.0
    # the same items scored the same way (option log-likelihood after "Question: ...\nAnswer:")
    assert models["base"]["lm_eval"]["cfdpo_local_mcq"]["acc"] == models["base"]["mcq_accuracy"]
    cache = json.loads((run / "eval" / "lm_eval.json").read_text())
    assert len(cache) == 2
    assert main(["evaluate", str(run), trust]) == 0  # cached: same results
    assert json.loads((run / "metrics.json").read_text())["models"] == models
    assert main(["report", str(run)]) == 0
    assert "cfdpo_local_mcq acc" in (run / "report.md").read_text()
