"""The report: `report.md` and a self-contained `report.html` (table, plots, sample answers).

Reads `metrics.json`, `eval/answers.jsonl` and each adapter's `train_log.json` (the dpo.auto validation
curve, when there is one); writes `plots/*.png`, `report.md`, `report.html`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from cfdpo import variants
from cfdpo.errors import CfdpoError
from cfdpo.runio import JsonlLog, check_inside, read_json, write_atomic

# what each model in the report is; the variants' adapters are noted by their label in the table of variants
MODEL_NOTES = {
    "base": "the model as it is",
    "prompted": "base model given the instruction at inference (the teacher)",
    "sft": "SFT context-distillation baseline",
    "steering": "base model with a steering vector added to one layer's residual stream (CAA-style mean "
                "difference of the training answers' activations; its layer and strength are in metrics.json)",
}


def model_note(name: str, default: str = "") -> str:
    if name in variants.BY_NAME:
        return variants.BY_NAME[name].label
    return MODEL_NOTES.get(name, default)


def fmt_value(x, digits: int = 3) -> str:
    """A metrics-table cell (here and in the benchmark's RESULTS.md): a float to `digits` decimals, None as '–'."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def table_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    conds = metrics.get("conditions", ["control"])
    head = ["model"]
    for c in conds:
        head += [f"score ({c})", f"words ({c})"]
    head += ["nll_ratio"]
    rows = []
    for name, m in metrics["models"].items():
        row = [name]
        for c in conds:
            row += [fmt_value(m.get(c, {}).get("score")), fmt_value(m.get(c, {}).get("mean_words"), 1)]
        row += [fmt_value(m.get("nll_ratio"))]
        extras = {"mcq_accuracy": m.get("mcq_accuracy")}
        for task, vals in (m.get("lm_eval") or {}).items():  # lm-eval: each task's accuracy-like metric
            key = next((k for k in ("acc", "acc_norm", "exact_match") if k in vals), None)
            if key:
                extras[f"{task} {key}"] = vals[key]
        for extra, value in extras.items():
            if value is not None:
                if extra not in head:
                    head.append(extra)
                row.append(fmt_value(value))
        rows.append(row)
    return head, rows


# --- the scorecard: one row per model, the four questions in column groups ---

SCORECARD_GROUPS = ("unasked (control)", "trained instruction", "held-out paraphrases (mean)", "other placements (mean)",
                    "in scope (retention)", "capability: KL to base", "capability: MCQ", "drift (control answers)")
NEAR_BASE = "≈ base"


def interval_cell(value, interval, near_base: bool = False, digits: int = 3) -> str:
    """'score [lo, hi]', with the ≈ base marker when the model is not distinguishable from base."""
    if value is None:
        return "–"
    cell = fmt_value(float(value), digits)
    if interval:
        cell += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return f"{cell} {NEAR_BASE}" if near_base else cell


def score_cell(entry: dict | None, label: str) -> str:
    """A condition's or a group's score; ≈ base when its paired difference from base includes 0."""
    if not entry:
        return "–"
    near = label != "base" and not (entry.get("vs_base") or {}).get("distinguishable", False)
    return interval_cell(entry.get("score"), entry.get("ci95"), near)


def retention_cell(model: dict, label: str) -> str:
    """Each in-scope context's retention (1.0 = kept as base has it); ≈ base when its interval covers 1."""
    cells = []
    for name, entry in (model.get("conditions") or {}).items():
        ret = entry.get("retention") if entry.get("kind") == "in_scope" else None
        if ret is None:
            continue
        ci = ret.get("ci95")
        near = label != "base" and ci is not None and ci[0] <= 1.0 <= ci[1]
        value = interval_cell(ret.get("ratio"), ci, near, 2) if ret.get("ratio") is not None else f"– ({ret.get('reason')})"
        cells.append(f"{name.removeprefix('in_scope:')}: {value}")
    return "; ".join(cells) or "–"


def capability_cells(model: dict, base: dict, label: str) -> list[str]:
    """KL to base [interval] (≈ base when the interval covers 0) and MCQ accuracy ± its standard error
    (≈ base when the difference from base is within 1.96 standard errors of a difference)."""
    cap = model.get("capability") or {}
    ci = cap.get("kl_ci95")
    kl = interval_cell(cap.get("kl"), ci, label != "base" and ci is not None and ci[0] <= 0.0 <= ci[1])
    acc, se = cap.get("mcq_accuracy"), cap.get("mcq_se")
    if acc is None:
        return [kl, "–"]
    base_cap = base.get("capability") or {}
    near = label != "base" and abs(acc - base_cap.get("mcq_accuracy", acc)) <= 1.96 * (se**2 + base_cap.get("mcq_se", 0) ** 2) ** 0.5
    return [kl, f"{acc:.3f} ± {se:.3f}" + (f" {NEAR_BASE}" if near else "")]


def drift_cell(model: dict) -> str:
    d = model.get("drift") or {}
    if not d.get("n"):
        return "–"
    return f"{d['mean_words']:.1f} words, {d['repeated_share']:.0%} repeated, {d['empty_share']:.0%} empty"


def scorecard_rows(metrics: dict) -> tuple[list[str], list[list[str]]] | None:
    """The scorecard table (None for metrics written before the scorecard)."""
    card = metrics.get("scorecard")
    if not card:
        return None
    which = card.get("instruction_of", "negative")
    base = metrics["models"].get("base", {})
    rows = []
    for label, model in metrics["models"].items():
        conds, groups = model.get("conditions") or {}, model.get("groups") or {}
        rows.append([label, score_cell(conds.get("control"), label), score_cell(conds.get(which), label),
                     score_cell(groups.get("paraphrase"), label), score_cell(groups.get("placement"), label),
                     retention_cell(model, label), *capability_cells(model, base, label), drift_cell(model)])
    return ["model", *SCORECARD_GROUPS], rows


def scorecard_legend(metrics: dict) -> str:
    """What each column group is, with its n."""
    card = metrics["scorecard"]
    which = card.get("instruction_of", "negative")
    sizes = {c["name"]: c["n_prompts"] for c in card["conditions"]}
    def group(kind):
        return [c for c in card["conditions"] if c["kind"] == kind and c["name"].startswith(which)]
    paras, places = group("paraphrase"), group("placement")
    in_scope = [c for c in card["conditions"] if c["kind"] == "in_scope"]
    cap = next(iter(metrics["models"].values())).get("capability") or {}
    parts = [
        f"Each prompt's score is the mean of its greedy answer and {card.get('samples_per_prompt', 0)} sampled "
        "answer(s); cells are the mean over prompts [95 % bootstrap interval over prompts].",
        f"unasked: control prompt, n={sizes.get('control', 0)} prompts; trained instruction: the {which} "
        f"instruction as trained, n={sizes.get(which, 0)};",
        f"paraphrases: {len(paras)} held-out rewordings pooled per prompt, n={paras[0]['n_prompts'] if paras else 0}; "
        f"placements: {', '.join(c['placement'] for c in places) or 'none'}, n={places[0]['n_prompts'] if places else 0};",
        "in scope: retention = model/base of the behaviour score where it is legitimate (base/model when the "
        "behaviour shows as a lower score), 1.0 = kept, " + (", ".join(f"{c['name'].removeprefix('in_scope:')} n="
                                                                        f"{c['n_prompts']}" for c in in_scope) or "none") + ";",
        f"KL(base ‖ model) in nats per answer on base's sampled answers to n={cap.get('n', 0)} unrelated prompts; "
        f"MCQ: accuracy ± standard error on n={cap.get('mcq_n', 0)} items.",
        f"\"{NEAR_BASE}\": not distinguishable from base (the interval of the difference covers 0, of retention 1).",
    ]
    return " ".join(parts)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())


def check_metrics(metrics, where: Path) -> dict:
    """metrics.json as `evaluate` writes it, or a one-line error."""
    ok = (isinstance(metrics, dict) and isinstance(metrics.get("models"), dict) and metrics["models"]
          and all(isinstance(m, dict) for m in metrics["models"].values())
          and isinstance(metrics.get("behaviour"), dict)
          and all(isinstance(metrics["behaviour"].get(k), str) for k in ("name", "scorer", "desired")))
    if not ok:
        raise CfdpoError(f"{where}: not the metrics cfdpo writes (expected 'behaviour' and 'models'); rerun `cfdpo evaluate`")
    return metrics


def plot(metrics: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(metrics["models"])
    conds = metrics.get("conditions", ["control"])
    b = metrics["behaviour"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(conds)
    for i, c in enumerate(conds):
        vals = [metrics["models"][n].get(c, {}).get("score") or 0.0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], vals, width, label=f"{c} prompt")
    ax.set_xticks([x + width * (len(conds) - 1) / 2 for x in range(len(names))], names)
    ax.set_ylabel(f"{b['scorer']} score ({b['desired']} is better)")
    ax.set_title(f"{b['name']}: behaviour score on held-out prompts")
    ax.legend()
    fig.tight_layout()
    p = out_dir / "score.png"
    _save(fig, p)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    vals = [metrics["models"][n].get("nll_ratio") or 0.0 for n in names]
    ax.bar(names, vals, color="#888")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("NLL ratio vs base (lower = closer)")
    ax.set_title("capability retention: NLL of base answers")
    fig.tight_layout()
    p = out_dir / "nll_ratio.png"
    _save(fig, p)
    plt.close(fig)
    paths.append(p)
    return paths


def plot_tradeoff(metrics: dict, out_dir: Path) -> Path | None:
    """plots/tradeoff.png: the behaviour score under the trained instruction (the negative one when
    there is one) against KL(base || model), one point per model with its intervals as bars."""
    card = metrics.get("scorecard")
    if not card:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    which = card.get("instruction_of", "negative")
    b = metrics["behaviour"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, model in metrics["models"].items():
        entry = (model.get("conditions") or {}).get(which) or {}
        cap = model.get("capability") or {}
        x, y = cap.get("kl"), entry.get("score")
        if x is None or y is None:
            continue
        xerr = [[x - cap["kl_ci95"][0]], [cap["kl_ci95"][1] - x]] if cap.get("kl_ci95") else None
        yerr = [[y - entry["ci95"][0]], [entry["ci95"][1] - y]] if entry.get("ci95") else None
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=label)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axvline(0.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("KL(base ‖ model), nats per answer (lower = closer to base)")
    ax.set_ylabel(f"{b['scorer']} score under the {which} instruction ({b['desired']} is better)")
    ax.set_title(f"{b['name']}: behaviour vs cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tradeoff.png"
    _save(fig, path)
    plt.close(fig)
    return path


def samples(run_dir: Path, metrics: dict, n: int) -> list[dict]:
    """Side-by-side answers for the first `n` held-out prompts: {prompt, condition, answers{model: text}}."""
    path = run_dir / "eval" / "answers.jsonl"
    if not path.is_file() or n <= 0:
        return []
    by: dict[tuple[str, str], dict] = {}
    for r in JsonlLog(path).rows:
        if r.get("sampled"):
            continue
        by.setdefault((r["prompt_id"], r["condition"]), {"prompt": r["prompt"], "condition": r["condition"], "answers": {}})
        by[(r["prompt_id"], r["condition"])]["answers"][r["model_label"]] = r["answer"]
    out = []
    for pid in metrics.get("eval_prompt_ids", [])[:n]:
        for c in metrics.get("conditions", ["control"]):
            if (pid, c) in by:
                out.append(by[(pid, c)])
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def scorecard_md(metrics: dict, tradeoff: Path | None, run_dir: Path) -> list[str]:
    card = scorecard_rows(metrics)
    if card is None:
        return []
    lines = ["## Scorecard", "", *md_table(card[0], [[_md_cell(c) for c in r] for r in card[1]]), "",
             scorecard_legend(metrics), ""]
    if tradeoff is not None:
        lines += [f"![tradeoff]({tradeoff.relative_to(run_dir).as_posix()})", ""]
    return lines + ["## Metrics", ""]


VALIDATION_NOTE = ("dpo.auto: the behaviour score on the validation prompts (held-out training prompts, left axis) "
                   "and KL(base ‖ model) per answer token (right axis) against the optimizer step; the dotted line "
                   "marks the step published as the adapter.")


def validation_md(curves: list[Path], run_dir: Path) -> list[str]:
    """The validation-curve section (none when no adapter was trained with dpo.auto)."""
    if not curves:
        return []
    return ["## Validation during training", "", VALIDATION_NOTE, "",
            *(line for p in curves for line in (f"![{p.stem}]({p.relative_to(run_dir).as_posix()})", ""))]


def render_md(metrics: dict, sample_rows: list[dict], plots: list[Path], run_dir: Path,
              tradeoff: Path | None = None, curves: list[Path] = ()) -> str:
    b = metrics["behaviour"]
    head, rows = table_rows(metrics)
    lines = [
        f"# cfdpo report: {b['name']}", "",
        *scorecard_md(metrics, tradeoff, run_dir),
        f"Scorer `{b['scorer']}` ({b.get('unit', '')}); **{b['desired']}** is better. "
        f"{metrics.get('n_eval_prompts', '?')} held-out prompts. `nll_ratio` = mean per-token NLL of the "
        "base model's sampled answers to the KL prompts under the model, divided by the base model's own.", "",
        *md_table(head, rows),
    ]
    lines += ["", "Models: " + "; ".join(f"`{n}` {model_note(n)}" for n in metrics["models"]), ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})", ""]
    lines += validation_md(list(curves), run_dir)
    if sample_rows:
        names = list(metrics["models"])
        lines += ["## Sample answers", ""]
        for s in sample_rows:
            lines += [f"**Prompt** ({s['condition']}): {_md_cell(s['prompt'])}", "",
                      *md_table(["model", "answer"], [[n, _md_cell(s["answers"][n])] for n in names if n in s["answers"]])]
            lines.append("")
    return "\n".join(lines) + "\n"


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # nothing is fetched, nothing runs


def _img(path: Path) -> str:
    return (f"<figure><img class='plot' alt='{html.escape(path.stem)}' "
            f"src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
            f"<figcaption>{html.escape(path.stem)}</figcaption></figure>")


def scorecard_html(metrics: dict, tradeoff: Path | None) -> str:
    card = scorecard_rows(metrics)
    if card is None:
        return ""
    e = html.escape
    table = "<table id='scorecard'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in card[0]) + "</tr></thead><tbody>"
    table += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in card[1]) + "</tbody></table>"
    return (f"<h2>Scorecard</h2>{table}<p class='legend'>{e(scorecard_legend(metrics))}</p>"
            + (_img(tradeoff) if tradeoff is not None else "") + "<h2>Metrics</h2>")


def render_html(metrics: dict, sample_rows: list[dict], plots: list[Path], tradeoff: Path | None = None,
                curves: list[Path] = ()) -> str:
    """One self-contained page: the scorecard, the metrics table, plots as data: URIs, the validation
    curves of dpo.auto adapters, and the sample answers side by side."""
    b = metrics["behaviour"]
    head, rows = table_rows(metrics)
    e = html.escape
    table = "<table id='metrics'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
    table += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>"
    notes = "".join(f"<li><b>{e(n)}</b>: {e(model_note(n, 'trained adapter'))}</li>" for n in metrics["models"])
    imgs = "".join(_img(p) for p in plots)
    if curves:
        imgs += (f"<h2 id='validation'>Validation during training</h2><p class='legend'>{e(VALIDATION_NOTE)}</p>"
                 + "".join(_img(p) for p in curves))
    names = list(metrics["models"])
    shown = [n for n in names if any(n in s["answers"] for s in sample_rows)]
    samples_html = ""
    if sample_rows:
        samples_html = (
            "<table id='samples'><thead><tr><th>prompt</th>" + "".join(f"<th>{e(n)}</th>" for n in shown)
            + "</tr></thead><tbody>"
            + "".join(
                f"<tr><td class='prompt'><span class='cond'>{e(s['condition'])}</span> {e(s['prompt'])}</td>"
                + "".join(f"<td>{e(s['answers'].get(n, ''))}</td>" for n in shown) + "</tr>"
                for s in sample_rows
            )
            + "</tbody></table>"
        )
    else:
        samples_html = "<p>No sample answers (eval/answers.jsonl is missing or evaluation.samples is 0).</p>"
    css = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;vertical-align:top}"
        "#metrics td,#metrics th{text-align:right}#metrics td:first-child,#metrics th:first-child{text-align:left}"
        "th{background:#eee}img.plot{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}"
        "#samples{table-layout:fixed;width:100%;font-size:0.9em}#samples td{white-space:pre-wrap;overflow-wrap:anywhere}"
        "#scorecard td{white-space:nowrap;font-size:0.9em}.legend{font-size:0.85em;color:#444}"
        "#samples td.prompt{background:#f7f7f7}.cond{display:inline-block;background:#dde;border-radius:3px;"
        "padding:0 4px;font-size:0.8em;margin-right:4px}"
    )
    data = json.dumps(metrics["models"]).replace("</", "<\\/")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>cfdpo report: {e(b['name'])}</title><style>{css}</style></head><body>"
        f"<h1>cfdpo report: {e(b['name'])}</h1>{scorecard_html(metrics, tradeoff)}"
        f"<p>Scorer <code>{e(b['scorer'])}</code>; <b>{e(b['desired'])}</b> is better; "
        f"{e(str(metrics.get('n_eval_prompts', '?')))} held-out prompts. <code>nll_ratio</code>: NLL of the base "
        f"model's sampled answers to the KL prompts under each model, relative to the base model (lower = closer to base).</p>"
        f"{table}<ul class='notes'>{notes}</ul>{imgs}"
        f"<h2>Sample answers, side by side</h2>{samples_html}"
        f"<script type='application/json' id='metrics-json'>{data}</script></body></html>"
    )


def write_report(run_dir: str | Path, n_samples: int | None = None) -> Path:
    run = Path(run_dir)
    check_inside(run)
    metrics = check_metrics(read_json(run / "metrics.json"), run / "metrics.json")
    if n_samples is None:
        try:
            from cfdpo.recipe import load_recipe

            n_samples = load_recipe(run / "recipe.yaml").evaluation.samples
        except Exception:  # noqa: BLE001 - the report still works without the recipe
            n_samples = 3
    from cfdpo.validation import plot_validation  # imports transformers: only when a report is written

    plots = plot(metrics, run / "plots")
    tradeoff = plot_tradeoff(metrics, run / "plots")
    curves = plot_validation(run)
    rows = samples(run, metrics, n_samples)
    write_atomic(run / "report.md", render_md(metrics, rows, plots, run, tradeoff, curves))
    write_atomic(run / "report.html", render_html(metrics, rows, plots, tradeoff, curves))
    return run / "report.md"
