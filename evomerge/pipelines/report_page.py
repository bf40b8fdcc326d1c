"""summary.md and summary.html from one report (the dict :func:`report.gather` builds).

The HTML page stands alone: CSS inline, figures embedded as base64 PNGs, so it can be mailed
or attached as one file. The Markdown page links the PNGs beside it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1180px;margin:24px auto;
padding:0 20px;color:#1d232b;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:30px 0 8px;border-bottom:1px solid #dde3ea;
padding-bottom:4px}.sub{color:#5a6573;margin:0 0 14px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13.5px}
th,td{border:1px solid #dde3ea;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#f3f6f9;font-weight:600}td:first-child,th:first-child{text-align:left}
tr.evolved td{font-weight:700;background:#eef7ee}
.kv td,.kv th{text-align:left}.kv td:first-child{color:#5a6573}
figure{margin:14px 0 22px}figure img{max-width:100%;border:1px solid #eef1f4}
figcaption{color:#5a6573;font-size:13px;margin-top:4px}
pre{background:#f6f8fa;border:1px solid #e3e8ee;padding:10px 12px;overflow:auto;font-size:12.5px}
code{font-size:90%}.note{color:#5a6573;font-size:13.5px}
.values{display:flex;flex-wrap:wrap;gap:0 24px}
"""


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def result_table(report: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and row classes of the main table: every model, score and every metric."""
    names = report["metric_names"]
    header = ["model", "kind", f"score ({report['metric']})"] + names
    rows, classes = [], []
    for r in report["rows"]:
        rows.append([r["model"], r["kind"], fmt(r["score"])] + [fmt(r["metrics"].get(m)) for m in names])
        classes.append("evolved" if r["kind"] == "evolved" else "")
    return header, rows, classes


def test_table(test: dict) -> tuple[list[str], list[list[str]], list[str]]:
    metrics = test["metrics"]
    header = ["model", "kind"] + [f"{split} {m}" for m in metrics for split in ("search", "test")]
    rows, classes = [], []
    for name, r in test["rows"].items():
        cells = [fmt(r.get(split, {}).get(m)) for m in metrics for split in ("search", "test")]
        rows.append([name, {"merge": "fixed merge"}.get(r.get("kind", ""), r.get("kind", ""))] + cells)
        classes.append("evolved" if r.get("kind") == "evolved" else "")
    return header, rows, classes


# -- Markdown ---------------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list[str]], bold: list[str] | None = None) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, cls in zip(rows, bold or [""] * len(rows), strict=True):
        out.append("| " + " | ".join(f"**{c}**" if cls and c else c for c in row) + " |")
    return out


def markdown(report: dict) -> str:
    md = [f"# {report['name']}", "", report["headline"], ""]
    md += report["notes"] and [*(f"> {n}" for n in report["notes"]), ""]
    md += ["## Results (search split)", "", *_md_table(*result_table(report)), ""]
    if report["test"]:
        md += ["## Held-out test split", "", report["test"].get("note", ""), "",
               *_md_table(*test_table(report["test"])), ""]
    md += ["## Sources", "", *(f"- `{k}`: `{v}`" for k, v in report["sources"]), ""]
    md += ["## Figures", ""]
    for fig in report["figures"]:
        md += [f"### {fig['title']}", "", f"![{fig['title']}]({fig['path'].name})", "", fig["caption"], ""]
    md += [f"## Best values (trial {report['best']['trial']})", "", "| value | chosen |", "|---|---|"]
    md += [f"| `{k}` | {v:.4f} |" for k, v in report["best"]["values"].items()] + [""]
    md += ["## Time and cost", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in report["timing"]), ""]
    md += ["## Recipe", "", "```yaml", report["recipe_text"].rstrip(), "```", "",
           f"Open the Optuna dashboard: `{report['dashboard']}`", ""]
    return "\n".join(md)


# -- HTML -------------------------------------------------------------------------------------

def _h(text) -> str:
    return html.escape(str(text))


def _html_table(header: list[str] | None, rows: list[list[str]], classes: list[str] | None = None, cls: str = "") -> str:
    head = "<thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in header) + "</tr></thead>" if header else ""
    body = "".join(f"<tr class='{c}'>" + "".join(f"<td>{_h(x)}</td>" for x in row) + "</tr>"
                   for row, c in zip(rows, classes or [""] * len(rows), strict=True))
    return f"<table class='{cls}'>{head}<tbody>{body}</tbody></table>"


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def page(report: dict) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_h(report['name'])}: evomerge report</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_h(report['name'])}</h1><p class='sub'>{_h(report['headline'])}</p>"]
    parts += [f"<p class='note'>{_h(n)}</p>" for n in report["notes"]]
    parts += ["<h2>Results (search split)</h2>", _html_table(*result_table(report))]
    if report["test"]:
        parts += ["<h2>Held-out test split</h2>", f"<p class='note'>{_h(report['test'].get('note', ''))}</p>",
                  _html_table(*test_table(report["test"]))]
    parts += ["<h2>Sources</h2>", _html_table(["role", "model"], [list(s) for s in report["sources"]], cls="kv")]
    parts.append("<h2>Figures</h2>")
    for fig in report["figures"]:
        parts.append(f"<figure><img alt='{_h(fig['title'])}' src='{_img(fig['path'])}'>"
                     f"<figcaption><b>{_h(fig['title'])}.</b> {_h(fig['caption'])}</figcaption></figure>")
    best = report["best"]
    values = [[k, f"{v:.4f}"] for k, v in best["values"].items()]
    half = (len(values) + 1) // 2 if len(values) > 12 else len(values)
    tables = "".join(_html_table(["value", "chosen"], chunk, cls="kv") for chunk in (values[:half], values[half:]) if chunk)
    parts += [f"<h2>Best values (trial {best['trial']})</h2><div class='values'>{tables}</div>"]
    parts += ["<h2>Time and cost</h2>", _html_table(None, [list(t) for t in report["timing"]], cls="kv")]
    parts += ["<h2>Recipe</h2>", f"<pre>{_h(report['recipe_text'].rstrip())}</pre>",
              f"<p class='note'>Open the study in a browser: <code>{_h(report['dashboard'])}</code></p>",
              "</body></html>"]
    return "\n".join(parts) + "\n"
