"""Scope-aware negation on the default model (SmolLM2-135M): does negation + retain keep French
where a deployer asks for it, while ignoring the same instruction in the user turn?

Two runs of one small recipe ("Answer only in French." negated, 24 training prompts), one with
`pairs.retain: true` (the second reuses the first's answers: same keys, no new generation). Each
model (base, negation, negation+retain) answers the held-out prompts greedily under the
instruction in the user turn and under it as the deployer's system prompt; the French share
(langdetect) is reported with n and a 95 % bootstrap interval (`cfdpo.stats.summary`).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src python bench/retain_check.py --out /tmp/retain_check
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from cfdpo import pipeline
from cfdpo.backends.transformers import generate_answers
from cfdpo.counterfactual import conversation
from cfdpo.generate import GenParams, answers_path
from cfdpo.models import load_model, load_tokenizer
from cfdpo.scorers import make_scorer
from cfdpo.stats import summary

INSTRUCTION = "Answer only in French."
RECIPE = {
    "model": "smollm2-135m",
    "behaviour": {"name": "french", "negative": INSTRUCTION, "placement": "user_prefix",
                  "scorer": {"name": "language", "desired": "lower", "params": {"lang": "fr"}}},
    "prompts": {"source": "general", "train_size": 24, "eval_size": 24, "seed": 0},
    "generation": {"samples": 1, "max_new_tokens": 48, "temperature": 0.7, "top_p": 0.9},
    "variants": ["negation"],
    "dpo": {"beta": 0.1, "learning_rate": 0.001, "epochs": 2, "batch_size": 4, "max_length": 256},
}
CONTEXTS = {"user turn": "user_prefix", "deployer system prompt": "system"}


def run_for(out: Path, name: str, retain: bool) -> pipeline.Run:
    data = json.loads(json.dumps(RECIPE))
    data["pairs"] = {"retain": retain}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return pipeline.open_run(out / name, path)


def french_shares(run: pipeline.Run, adapters: dict[str, Path], max_new_tokens: int) -> dict:
    """{model: {context: summary}} of the held-out prompts' greedy answers."""
    from peft import PeftModel

    _, held_out = run.split()
    tok = load_tokenizer(run.model_path)
    tok.padding_side = "left"
    model = load_model(run.model_path, "float32")
    names = list(adapters)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    scorer = make_scorer("language", {"lang": "fr"})
    params = GenParams(max_new_tokens, 0.0, 1.0)
    results: dict = {}
    for label in ["base", *names]:
        if label == "base":
            model.base_model.disable_adapter_layers()
        else:
            model.base_model.enable_adapter_layers()
            model.set_adapter(label)
        for context, placement in CONTEXTS.items():
            conversations = [conversation(p["prompt"], INSTRUCTION, placement) for p in held_out]
            answers: dict[int, str] = {}

            def keep(indices, texts, _counts, into=answers):
                into.update({i: batch[0] for i, batch in zip(indices, texts)})

            generate_answers(model, tok, conversations, params, [1] * len(conversations), 24, 0, keep)
            scores = {held_out[i]["id"]: scorer.score_one(answers[i]) for i in range(len(held_out))}
            results.setdefault(label, {})[context] = {**summary(scores), "example": answers[0][:160]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the two run directories")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    plain = run_for(args.out, "negation", retain=False)
    scoped = run_for(args.out, "negation_retain", retain=True)
    pipeline.generate(plain)
    if not answers_path(scoped.dir).is_file():
        shutil.copyfile(answers_path(plain.dir), answers_path(scoped.dir))
    assert pipeline.generate(scoped) == 0  # the same answers: retain needs no generation of its own
    stats = {"negation": pipeline.build_pairs(plain)["negation"], "negation+retain": pipeline.build_pairs(scoped)["negation"]}
    pipeline.train(plain)
    pipeline.train(scoped)
    adapters = {"negation": plain.dir / "adapters" / "negation", "negation+retain": scoped.dir / "adapters" / "negation"}
    shares = french_shares(plain, adapters, RECIPE["generation"]["max_new_tokens"])
    report = {"pairs": {k: {"count": v["count"], "kinds": {n: s["count"] for n, s in v.get("kinds", {}).items()}}
                        for k, v in stats.items()},
              "french_share": shares, "seconds": round(time.monotonic() - start, 1)}
    (args.out / "retain_check.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"{'model':<18}{'context':<26}{'French share':>13}  95 % interval  n")
    for label, by_context in shares.items():
        for context, s in by_context.items():
            lo, hi = s["ci95"]
            print(f"{label:<18}{context:<26}{s['score']:>13.2f}  [{lo:.2f}, {hi:.2f}]   {s['n']}")
    print(json.dumps(report["pairs"]), f"{report['seconds']} s")


if __name__ == "__main__":
    main()
