"""The report: `report.md` and a self-contained `report.html` (table, plots, sample answers).

Reads `metrics.json` and `eval/answers.jsonl`; writes `plots/*.png`, `report.md`, `report.html`.
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


def samples(run_dir: Path, metrics: dict, n: int) -> list[dict]:
    """Side-by-side answers for the first `n` held-out prompts: {prompt, condition, answers{model: text}}."""
    path = run_dir / "eval" / "answers.jsonl"
    if not path.is_file() or n <= 0:
        return []
    by: dict[tuple[str, str], dict] = {}
    for r in JsonlLog(path).rows:
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


def render_md(metrics: dict, sample_rows: list[dict], plots: list[Path], run_dir: Path) -> str:
    b = metrics["behaviour"]
    head, rows = table_rows(metrics)
    lines = [
        f"# cfdpo report: {b['name']}", "",
        f"Scorer `{b['scorer']}` ({b.get('unit', '')}); **{b['desired']}** is better. "
        f"{metrics.get('n_eval_prompts', '?')} held-out prompts. `nll_ratio` = mean per-token NLL of the base "
        "model's held-out control answers under the model, divided by the base model's own.", "",
        *md_table(head, rows),
    ]
    lines += ["", "Models: " + "; ".join(f"`{n}` {model_note(n)}" for n in metrics["models"]), ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})", ""]
    if sample_rows:
        names = list(metrics["models"])
        lines += ["## Sample answers", ""]
        for s in sample_rows:
            lines += [f"**Prompt** ({s['condition']}): {_md_cell(s['prompt'])}", "",
                      *md_table(["model", "answer"], [[n, _md_cell(s["answers"][n])] for n in names if n in s["answers"]])]
            lines.append("")
    return "\n".join(lines) + "\n"


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # nothing is fetched, nothing runs


def render_html(metrics: dict, sample_rows: list[dict], plots: list[Path]) -> str:
    """One self-contained page: metrics table, plots as data: URIs, and the sample answers side by side."""
    b = metrics["behaviour"]
    head, rows = table_rows(metrics)
    e = html.escape
    table = "<table id='metrics'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
    table += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>"
    notes = "".join(f"<li><b>{e(n)}</b>: {e(model_note(n, 'trained adapter'))}</li>" for n in metrics["models"])
    imgs = "".join(
        f"<figure><img class='plot' alt='{e(p.stem)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption>{e(p.stem)}</figcaption></figure>"
        for p in plots
    )
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
        "#samples td.prompt{background:#f7f7f7}.cond{display:inline-block;background:#dde;border-radius:3px;"
        "padding:0 4px;font-size:0.8em;margin-right:4px}"
    )
    data = json.dumps(metrics["models"]).replace("</", "<\\/")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>cfdpo report: {e(b['name'])}</title><style>{css}</style></head><body>"
        f"<h1>cfdpo report: {e(b['name'])}</h1>"
        f"<p>Scorer <code>{e(b['scorer'])}</code>; <b>{e(b['desired'])}</b> is better; "
        f"{e(str(metrics.get('n_eval_prompts', '?')))} held-out prompts. <code>nll_ratio</code>: NLL of the base "
        f"model's held-out answers under each model, relative to the base model (lower = closer to base).</p>"
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
    plots = plot(metrics, run / "plots")
    rows = samples(run, metrics, n_samples)
    write_atomic(run / "report.md", render_md(metrics, rows, plots, run))
    write_atomic(run / "report.html", render_html(metrics, rows, plots))
    return run / "report.md"
