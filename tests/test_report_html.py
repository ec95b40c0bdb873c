"""report.html opened in headless Chromium: the table and the plots render, the page is self-contained.

Chromium is the Debian `chromium` package (`make test` installs it where apt-get works); the test
skips, saying so, only when it is not there. The report is built from a synthetic metrics.json and
eval/answers.jsonl, so no model is needed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cfdpo.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
MODELS = ["base", "prompted", "enc", "negation"]


GROUPS = ["unasked (control)", "trained instruction", "held-out paraphrases (mean)", "other placements (mean)",
          "in scope (retention)", "capability: KL to base", "capability: MCQ", "drift (control answers)"]
CONDITIONS = [("control", "control", 3), ("negative", "negative", 3), ("negative:para1", "paraphrase", 2),
              ("negative@system", "placement", 2), ("in_scope:persona", "in_scope", 2)]


def scorecard_entries(i: int) -> dict:
    """A scripted model's scorecard keys: model i's scores move away from base's with i."""
    def entry(kind, n, score, moved):
        vs = {"diff": score - 1.0, "ci95": [score - 1.2, score - 0.8] if moved else [-0.5, 0.5], "p": 0.01,
              "n": n, "distinguishable": moved}
        return {"kind": kind, "instruction": None, "placement": "user_prefix", "score": score,
                "ci95": [score - 0.2, score + 0.2], "n": n, "vs_base": vs}
    conds = {name: entry(kind, n, 1.0 + i / 10 * (name != "control"), i >= 2) for name, kind, n in CONDITIONS}
    conds["in_scope:persona"]["retention"] = {"ratio": 1.0 - i / 10, "ci95": [0.8 - i / 10, 1.2 - i / 10], "n": 2,
                                              "reason": None, "orientation": "model/base"}
    groups = {"instruction_of": "negative", "paraphrase": {"conditions": ["negative:para1"], **conds["negative:para1"]},
              "placement": {"conditions": ["negative@system"], **conds["negative@system"]}}
    capability = {"kl": 0.3 * i, "kl_ci95": [0.2 * i, 0.4 * i], "kl_per_token": 0.01 * i, "n": 4,
                  "mcq_accuracy": 0.5 + i / 100, "mcq_se": 0.05, "mcq_detectable": 0.2, "mcq_n": 100}
    return {"conditions": conds, "groups": groups, "capability": capability,
            "drift": {"n": 3, "mean_words": 20.0 + i, "empty_share": 0.0, "repeated_share": i / 10}}


SCORECARD = {"conditions": [{"name": name, "kind": kind, "instruction": None, "placement": "user_prefix",
                             "n_prompts": n} for name, kind, n in CONDITIONS],
             "instruction_of": "negative", "samples_per_prompt": 1, "kl_prompts": 4}


def synthetic_run(d: Path) -> Path:
    metrics = {
        "behaviour": {"name": "pirate", "scorer": "lexicon", "desired": "lower", "unit": "hits per 100 words"},
        "conditions": ["control", "negative"],
        "n_eval_prompts": 3,
        "eval_prompt_ids": ["p1", "p2", "p3"],
        "models": {
            name: {"control": {"score": 0.5 + i, "mean_words": 20.0 + i}, "negative": {"score": 3.0 - i, "mean_words": 30.0},
                   "nll": 2.0 + i / 10, "nll_ratio": 1.0 + i / 20, **scorecard_entries(i)}
            for i, name in enumerate(MODELS)
        },
        "scorecard": SCORECARD,
    }
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    rows = []
    for pid, prompt in (("p1", "What is rain?"), ("p2", "Explain <b>tides</b> & moons."), ("p3", "Why is the sky blue?")):
        for cond in ("control", "negative"):
            for name in MODELS:
                text = f"{name} answers {prompt!r} under {cond}" + (" arr matey!" if name == "base" and cond == "negative" else ".")
                rows.append({"key": f"{pid}-{cond}-{name}", "prompt_id": pid, "prompt": prompt, "condition": cond,
                             "model_label": name, "answer": text})
    (d / "eval").mkdir()
    (d / "eval" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(d, n_samples=2)
    return d / "report.html"


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs the Debian package where apt-get works)")
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_html_is_self_contained(tmp_path):
    page = synthetic_run(tmp_path / "run").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//|file:)""", page)
    assert "Content-Security-Policy" in page
    assert page.count("data:image/png;base64,") == 3  # the trade-off plot, scores, nll_ratio
    assert "&lt;b&gt;tides&lt;/b&gt;" in page and "<b>tides</b>" not in page  # answers and prompts are escaped
    assert json.loads(re.search(r"id='metrics-json'>(.*?)</script>", page).group(1))["enc"]["nll_ratio"] == 1.1


def test_report_renders_in_headless_chromium(tmp_path):
    report = synthetic_run(tmp_path / "run")
    # 1. the DOM after layout: a probe page frames the report and reads what the browser rendered
    probe = tmp_path / "run" / "probe.html"
    probe.write_text(
        "<!doctype html><html><body><iframe id='f' src='report.html' style='width:1200px;height:2000px'></iframe><script>"
        "document.getElementById('f').onload = () => {"
        " const d = document.getElementById('f').contentDocument;"
        " const imgs = [...d.querySelectorAll('img.plot')].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
        " const rows = [...d.querySelectorAll('#metrics tbody tr')].map(r => r.cells[0].textContent);"
        " const card = [...d.querySelectorAll('#scorecard tr')].map(r => [...r.cells].map(c => c.textContent));"
        " const samples = d.querySelectorAll('#samples tbody tr').length;"
        " const heads = [...d.querySelectorAll('#samples thead th')].map(h => h.textContent);"
        " document.body.setAttribute('data-probe', JSON.stringify({imgs, rows, card, samples, heads,"
        "   tableWidth: d.getElementById('metrics').getBoundingClientRect().width}));"
        "};</script></body></html>"
    )
    res = chromium(["--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                   tmp_path / "profile1")
    m = re.search(r"data-probe=\"([^\"]*)\"", res.stdout)
    assert m, f"the probe did not run; chromium said: {res.stderr[-2000:]}"
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert found["rows"] == MODELS
    assert found["card"][0] == ["model", *GROUPS] and [r[0] for r in found["card"][1:]] == MODELS
    assert found["tableWidth"] > 200
    assert len(found["imgs"]) == 3
    for complete, width, height in found["imgs"]:
        assert complete and width > 300 and height > 200  # the embedded PNGs decoded
    assert found["samples"] == 4  # 2 prompts x 2 conditions
    assert found["heads"] == ["prompt", *MODELS]

    # 2. a screenshot: not blank, and the plots' bars are on it
    shot = tmp_path / "report.png"
    res = chromium([f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri()], tmp_path / "profile2")
    assert shot.is_file(), res.stderr[-2000:]
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1200)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 100, "the screenshot is (nearly) blank"
    assert (img.min(axis=2) < 200).mean() > 0.02, "hardly anything dark on the page"
    blue = np.abs(img.astype(int) - [31, 119, 180]).sum(axis=2) < 30  # matplotlib's first bar colour
    assert blue.sum() > 500, "the score plot's bars are not on the screenshot"
    shutil.copy(shot, tmp_path / "run" / "screenshot.png")


def test_report_md_leads_with_every_scorecard_group(tmp_path):
    synthetic_run(tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert md.index("## Scorecard") < md.index("## Metrics") < md.index("| model | score (control)")
    head = next(line for line in md.splitlines() if line.startswith("| model | unasked"))
    assert head == "| " + " | ".join(["model", *GROUPS]) + " |"
    card = md[md.index("## Scorecard"):md.index("## Metrics")].splitlines()
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in card if line.startswith("| ") and "unasked" not in line}
    enc, negation = rows["enc"], rows["negation"]  # i = 2 and 3: distinguishable from base
    assert rows["prompted"][1] == "1.100 [0.900, 1.300] ≈ base"  # i = 1: its difference covers 0
    assert negation[1] == "1.300 [1.100, 1.500]" and negation[2].startswith("1.300 [")
    assert enc[4] == "persona: 0.80 [0.60, 1.00] ≈ base" and negation[4] == "persona: 0.70 [0.50, 0.90]"
    assert negation[5] == "0.900 [0.600, 1.200]" and negation[6] == "0.530 ± 0.050 ≈ base"
    assert negation[7].startswith("23.0 words, 30% repeated")
    assert "n=3 prompts" in md and "n=2" in md and "n=100 items" in md
    assert "plots/tradeoff.png" in md and (tmp_path / "run" / "plots" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_report_shows_the_validation_curve_of_each_auto_adapter_and_no_section_without_one(tmp_path):
    run = synthetic_run(tmp_path / "run").parent
    assert "Validation during training" not in (run / "report.md").read_text(encoding="utf-8")
    assert "Validation during training" not in (run / "report.html").read_text(encoding="utf-8")
    curve = [{"step": 0, "score": 2.0, "kl": 0.0}, {"step": 6, "score": 1.2, "kl": 0.03}, {"step": 12, "score": 0.9, "kl": 0.2}]
    logs = {"negation": {"validation": curve, "best_step": 6, "auto": {"condition": "negative", "max_kl": 0.1}},
            "enc": {"log_history": []}}  # trained without dpo.auto: no curve
    for name, log in logs.items():
        (run / "adapters" / name).mkdir(parents=True)
        (run / "adapters" / name / "train_log.json").write_text(json.dumps(log))
    write_report(run, n_samples=2)
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "## Validation during training" in md and "![validation_negation](plots/validation_negation.png)" in md
    assert "validation_enc" not in md and not (run / "plots" / "validation_enc.png").exists()
    assert (run / "plots" / "validation_negation.png").read_bytes()[:4] == b"\x89PNG"
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4 and "alt='validation_negation'" in page
