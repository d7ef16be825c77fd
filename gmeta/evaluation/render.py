"""Rendering the evaluation report: Markdown, HTML, JSON and plots, and logging them."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from gmeta import metrics
from gmeta.evaluation.report import SCORERS, flat_metrics, objective_of


def _cell(value, metric: str, fmt: str = ".4f") -> str:
    """A metric as the report shows it; one that could not be computed (NaN: e.g. the AUC of
    rows of one class) as "n/a (<reason>)", not a bare nan."""
    if isinstance(value, str):  # already "n/a (...)": a report read back from eval_report.json
        return value
    if value is None or math.isnan(value):
        return metrics.not_available(metric)
    return format(value, fmt)


def _json_ready(value, key: str = ""):
    """The report for eval_report.json: NaN metrics as "n/a (<reason>)" (a bare NaN is not
    even valid JSON), the rest as is."""
    if isinstance(value, dict):
        return {k: _json_ready(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v, key) for v in value]  # the K curve: {"auc": [...], ...}
    if isinstance(value, float) and math.isnan(value):
        return metrics.not_available(key)
    return value


def format_table(report: dict) -> str:
    """Markdown: overall table, the main metric (AUC, or RMSE for regression) per
    support-size bucket, and the curve metrics vs. K. Metrics that could not be computed
    show as "n/a (<reason>)"."""
    obj = objective_of(report)
    names = [n for n in SCORERS if f"{n}_{obj.main}" in report]
    lines = ["| model | " + " | ".join(h for h, _, _ in obj.columns) + " |", "|---|" + "---|" * len(obj.columns)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_cell(report[f"{n}_{m}"], m, fmt) for _, m, fmt in obj.columns)
                     + " |")
    labels = report.get("labels") or []
    if labels:  # several labels: the table above is the first's; each label's own
        heads = [(h, m, fmt) for h, m, fmt in obj.columns if f"{names[0]}_{m}_{labels[0]}" in report]
        lines += ["", f"Per label ({', '.join(labels)}; the table above is {labels[0]}'s):", "",
                  "| model | label | " + " | ".join(h for h, _, _ in heads) + " |", "|---|---|" + "---|" * len(heads)]
        for n in names:
            lines += [f"| {n} | {label} | " + " | ".join(_cell(report.get(f"{n}_{m}_{label}", float("nan")), m, fmt)
                                                     for _, m, fmt in heads) + " |"
                      for label in labels if f"{n}_{obj.main}_{label}" in report]
        esmm = [n for n in names if f"{n}_ctcvr_auc" in report]
        if esmm:
            lines += ["", "ESMM: pCTCVR AUC (every row) / pCVR AUC (clicked rows): " + ", ".join(
                f"{n} {_cell(report[f'{n}_ctcvr_auc'], 'auc')} / {_cell(report[f'{n}_cvr_auc'], 'auc')}"
                for n in esmm)]
    lines.append(f"\n{int(report['tasks'])} held-out tasks, {int(report['query_rows'])} query rows, "
                 f"{int(report['inner_steps'])} inner steps")
    if report.get("erm_ft_choice"):
        lines.append(f"erm_ft: the ERM baseline fine-tuned on each task's support rows, {report['erm_ft_choice']}")
    if report.get("new_ids"):
        lines.append("ids new to training (share of this split's occurrences / of its distinct ids): " + ", ".join(
            f"{f} {100 * v['occurrences']:.1f}% / {100 * v['ids']:.1f}%" for f, v in report["new_ids"].items()))
    main = obj.main.upper()
    if report.get("buckets"):
        lines += ["", f"{main} by support-set size (cold-start bucket):", "",
                  "| support rows | tasks | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for b in report["buckets"]:
            lines.append(f"| {b['support']} | {int(b['tasks'])} | "
                         + " | ".join(_cell(b[f"{n}_{obj.main}"], obj.main) for n in names) + " |")
    c = report.get(f"{obj.main}_vs_k")
    if c:
        lines += ["", f"{main} vs. inner steps K:", "", "| K | " + " | ".join(str(k) for k in c["k"]) + " |",
                  "|---|" + "---|" * len(c["k"])]
        lines += [f"| {m.upper()} | " + " | ".join(_cell(v, m) for v in c[m]) + " |" for m in obj.curve]
    return "\n".join(lines)


def format_html(report: dict, plots: list[str]) -> str:
    """A standalone HTML page: the Markdown tables as HTML tables and the plots inline."""
    body: list[str] = []
    table: list[str] = []

    def flush():
        if table:
            head, *rows = [[c.strip() for c in r.strip("|").split("|")] for r in table if not r.startswith("|---")]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            table.clear()

    for line in format_table(report).splitlines():
        if line.startswith("|"):
            table.append(line)
        else:
            flush()
            if line.strip():
                body.append(f"<p>{html.escape(line.strip())}</p>")
    flush()
    body += [f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gmeta evaluation</title>"
            f"<style>{style}</style></head><body><h1>Cold-start evaluation</h1>{''.join(body)}</body></html>\n")


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """eval_report.{json,md,html} and the PNG plots into ``out_dir``; returns the files."""
    from gmeta.evaluation import plots

    obj = objective_of(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [plots.metric_vs_steps(report, out / f"{obj.main}_vs_k.png", obj.curve),
             plots.metric_by_bucket(report, out / f"{obj.main}_by_support_size.png", obj.main)]
    if "reliability" in report:
        files.append(plots.calibration(report, out / "calibration.png"))
    (out / "eval_report.json").write_text(json.dumps(_json_ready(report), indent=2))
    (out / "eval_report.md").write_text(format_table(report) + "\n")
    (out / "eval_report.html").write_text(format_html(report, [p.name for p in files]))
    return [out / "eval_report.json", out / "eval_report.md", out / "eval_report.html", *files]


def log_report(tracker, report: dict, files: list[Path], step: int) -> None:
    """Metrics (eval/...), the K curves (``eval/<metric>_vs_k``, metric history with step = K)
    and the files."""
    tracker.log_metrics({f"eval/{k}": v for k, v in flat_metrics(report).items()}, step=step)
    obj = objective_of(report)
    c = report[f"{obj.main}_vs_k"]
    for i, k in enumerate(c["k"]):
        tracker.log_metrics({f"eval/{m}_vs_k": c[m][i] for m in obj.curve}, step=k)
    for f in files:
        tracker.log_artifact(f, "eval")
