"""A self-contained HTML page from evaluation documents (`graftlm eval --out`, or a registry's versions):
figures per version over time, grade distributions per rubric dimension, side-by-side win rates with
their intervals, and the worst examples with the judge's reasons.

Charts are matplotlib's, inlined as SVG: the page needs no network and no script to open.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.errors import ConfigError
from graftlm.eval.suite import FORMAT, HEADLINE

COLOURS = {"good": "#2e7d32", "neutral": "#f9a825", "poor": "#c62828", "failed": "#616161"}
WORST = 5
RATES = ("win_rate", "tie_rate", "loss_rate")


@dataclass(frozen=True)
class Run:
    """One evaluation document and what it is called on the page (a file name or a version)."""

    label: str
    doc: dict[str, Any]


def read_run(path: Path, label: str = "") -> Run:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: {e.msg}; not an evaluation document") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an evaluation document (`graftlm eval --out`, format {FORMAT})")
    return Run(label or Path(path).stem, doc)


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(name: str, caption: str, svg: str) -> str:
    caption = f"<figcaption>{html.escape(caption)}</figcaption>"
    return f'<figure class="chart" data-chart="{html.escape(name)}">{svg}{caption}</figure>'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; the charts go into the page
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 10})  # text stays text: searchable, sharp
    return plt


def trend_chart(runs: Sequence[Run]) -> str:
    """Each contestant's headline figures across runs (versions, in order)."""
    plt = _pyplot()
    series: dict[str, dict[int, float]] = {}
    for x, run in enumerate(runs):
        for label, c in run.doc["contestants"].items():
            for name, g in c["graders"].items():
                key = _key(name, g["figures"])
                if key in g["figures"]:
                    series.setdefault(f"{label}: {name}" + ("" if key == name else f" {key}"), {})[x] = g["figures"][
                        key
                    ]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=20, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("figure (0 to 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _figure("trend", "Figures per evaluation, in order", _svg(fig))


def distribution_chart(doc: dict[str, Any], grader: str) -> str:
    """good / neutral / poor (and unjudged) per rubric dimension and overall, one bar group per contestant."""
    plt = _pyplot()
    rows: list[tuple[str, dict[str, int]]] = []
    for label, c in doc["contestants"].items():
        g = c["graders"].get(grader)
        if g is None:
            continue
        dims = list(dict.fromkeys(d for grade in g["grades"] for d in grade.get("dimensions", {})))
        for dim in ["overall", *dims]:
            counts = dict.fromkeys(COLOURS, 0)
            for grade in g["grades"]:
                word = grade.get("label", "") if dim == "overall" else grade.get("dimensions", {}).get(dim, "failed")
                counts[word if word in counts else "failed"] += 1
            rows.append((f"{label}: {dim}", counts))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.0))
    left = [0.0] * len(rows)
    for word, colour in COLOURS.items():
        widths = [counts[word] / max(1, sum(counts.values())) for _, counts in rows]
        ax.barh(range(len(rows)), widths, left=left, color=colour, label=word)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of outputs")
    ax.legend(ncol=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _figure(f"grades-{grader}", f"{grader}: grades per dimension (overall: good only if all good)", _svg(fig))


def preference_chart(doc: dict[str, Any]) -> str:
    """Win / tie / loss shares per comparison, with the win rate's 95% interval."""
    plt = _pyplot()
    cmps = doc["comparisons"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(cmps) + 1.0))
    left = [0.0] * len(cmps)
    for key, colour in (("win_rate", "#2e7d32"), ("tie_rate", "#9e9e9e"), ("loss_rate", "#c62828")):
        widths = [c["figures"].get(key, 0.0) for c in cmps]
        ax.barh(range(len(cmps)), widths, left=left, color=colour, label=key.removesuffix("_rate"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for i, c in enumerate(cmps):
        f = c["figures"]
        ax.errorbar(
            f["win_rate"],
            i,
            xerr=[[f["win_rate"] - f["win_rate_low"]], [f["win_rate_high"] - f["win_rate"]]],
            fmt="none",
            ecolor="black",
            capsize=4,
        )
    ax.set_yticks(range(len(cmps)), [f"{c['model']} vs {c['other']}" for c in cmps])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of pairs (each judged twice, positions swapped); bars: 95% interval of the win rate")
    ax.legend(ncol=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _figure("preference", "Side by side", _svg(fig))


def preference_table(doc: dict[str, Any]) -> str:
    """The comparisons' rates with intervals, and how far the judge can be trusted with them."""
    rows = []
    for c in doc["comparisons"]:
        f = c["figures"]
        rates = "".join(f"<td>{f[k]:.2f} [{f[k + '_low']:.2f}, {f[k + '_high']:.2f}]</td>" for k in RATES)
        agree = f"{f['metric_agreement']:.2f} of {f['metric_agreement_n']:.0f}" if "metric_agreement" in f else "-"
        rows.append(
            f"<tr><td>{_cell(c['model'])}</td><td>{_cell(c['other'])}</td>{rates}"
            f"<td>{f['consistency']:.2f}</td><td>{agree}</td><td>{f['failed_rate']:.2f}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("model", "against", "win", "tie", "loss", "same after swap", "agrees with metric", "unjudged")
    )
    return f'<table class="preference"><tr>{head}</tr>{"".join(rows)}</table>'


def _cell(text: Any, limit: int = 400) -> str:
    s = "" if text is None else str(text)
    return html.escape(s if len(s) <= limit else s[:limit] + " …")


def worst_examples(doc: dict[str, Any], n: int = WORST) -> str:
    """The lowest-graded outputs of each contestant and grader, with the reasons given."""
    parts = []
    for label, c in doc["contestants"].items():
        for name, g in c["graders"].items():
            set_name = g["set"]
            cases, answers = doc["sets"][set_name], c["answers"].get(set_name, [])
            order = sorted(range(len(g["grades"])), key=lambda i: g["grades"][i]["score"])[:n]
            rows = "".join(
                f"<tr><td>{_cell(_grade_word(g['grades'][i]))}</td>"
                f"<td>{_cell(cases[i]['prompt'])}</td><td>{_cell(answers[i] if i < len(answers) else '')}</td>"
                f"<td>{_cell(cases[i].get('reference'))}</td>"
                f"<td>{_cell('; '.join(g['grades'][i].get('reasons', [])))}</td></tr>"
                for i in order
            )
            parts.append(
                f'<h3>{_cell(label)}: {_cell(name)}</h3><table class="worst"><tr><th>grade</th><th>prompt</th>'
                f"<th>answer</th><th>reference</th><th>reasons</th></tr>{rows}</table>"
            )
    return "".join(parts)


def _key(name: str, f: dict[str, float]) -> str:
    """The figure that stands for a grader: good_rate for rubrics, else its headline or its own name."""
    return "good_rate" if "good_rate" in f else HEADLINE.get(name, name if name in f else "score")


def _grade_word(grade: dict[str, Any]) -> str:
    return grade.get("label") or f"{grade['score']:.2f}"


def _headline(name: str, f: dict[str, float]) -> str:
    if "good_rate" in f:
        return f"good {f['good_rate']:.2f} / neutral {f['neutral_rate']:.2f} / poor {f['poor_rate']:.2f}"
    key = _key(name, f)
    interval = f" [{f[key + '_low']:.2f}, {f[key + '_high']:.2f}]" if key + "_low" in f else ""
    return f"{key} {f[key]:.3f}{interval}"


def summary_table(runs: Sequence[Run]) -> str:
    rows = []
    for run in runs:
        for label, c in run.doc["contestants"].items():
            figures = "<br>".join(f"{_cell(n)}: {_cell(_headline(n, g['figures']))}" for n, g in c["graders"].items())
            rows.append(f"<tr><td>{_cell(run.label)}</td><td>{_cell(label)}</td><td>{figures}</td></tr>")
    return f'<table class="summary"><tr><th>evaluation</th><th>model</th><th>figures</th></tr>{"".join(rows)}</table>'


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}figure{margin:1.5em 0}figcaption{color:#555;
font-size:13px}.warn{color:#b71c1c}"""


def render(runs: Sequence[Run], title: str) -> str:
    """The whole page; the last run is the one whose grades and examples are shown in detail."""
    if not runs:
        raise ConfigError("no evaluation to report")
    last = runs[-1].doc
    body = [f"<h1>{_cell(title)}</h1>"]
    judge = last.get("judge")
    meta = f"task {_cell(last.get('task'))}, base model {_cell(last.get('model'))}, created {_cell(last['created'])}"
    body.append(f"<p>{meta}" + (f", judge {_cell(judge['model'])} at {_cell(judge['url'])}" if judge else "") + "</p>")
    if not last.get("complete", True):
        body.append(f'<p class="warn">incomplete: {_cell(last.get("error"))}</p>')
    body += ["<h2>Figures</h2>", summary_table(runs)]
    if len(runs) > 1:
        body += ["<h2>Over time</h2>", trend_chart(runs)]
    rubric = list(
        dict.fromkeys(n for c in last["contestants"].values() for n in c["graders"] if n.startswith("rubric"))
    )
    if rubric:
        body.append("<h2>Grade distributions</h2>")
        body += [distribution_chart(last, name) for name in rubric]
    if last["comparisons"]:
        body += ["<h2>Side by side</h2>", preference_chart(last), preference_table(last)]
    body += ["<h2>Worst examples</h2>", worst_examples(last)]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_cell(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
