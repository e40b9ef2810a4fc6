"""`graftlm report`: the page is rendered by a real headless Chromium, and its charts and tables are there."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from graftlm.cli.main import main
from graftlm.eval.grade import Grade
from graftlm.eval.preference import Pair, preference_figures
from graftlm.eval.rubric import SUMMARY, rubric_figures
from graftlm.eval.suite import FORMAT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DIMS = [d.name for d in SUMMARY.dimensions]


def doc(good: int, created: str) -> dict:
    """An evaluation of base and an adapter on 4 prompts; the adapter's first `good` outputs graded good."""
    grades = {
        "base": [Grade(0.0, "poor", ["base rambles"], dict.fromkeys(DIMS, "poor"))] * 4,
        "adapter": [Grade(1.0, "good", ["crisp"], dict.fromkeys(DIMS, "good"))] * good
        + [
            Grade(
                0.5, "neutral", ["misses a point <b>"], {**dict.fromkeys(DIMS, "good"), "comprehensiveness": "neutral"}
            )
        ]
        * (3 - good)
        + [Grade.failure("judge reply: missing reason")],
    }
    pairs = [
        Pair("model", "model", "win"),
        Pair("model", "other", "tie"),
        Pair("other", "other", "loss"),
        Pair("model", "tie", "win"),
    ]
    return {
        "format": FORMAT,
        "created": created,
        "task": "summarize",
        "data": "test.jsonl",
        "model": "tiny",
        "judge": {"url": "http://127.0.0.1:1/v1", "model": "judge"},
        "complete": True,
        "error": "",
        "sets": {"test": [{"prompt": f"Summarize text {i}", "reference": f"ref {i}"} for i in range(4)]},
        "contestants": {
            label: {
                "answers": {"test": [f"{label} answer {i}" for i in range(4)]},
                "graders": {
                    "rubric": {
                        "set": "test",
                        "figures": rubric_figures(g, DIMS),
                        "grades": [x.as_dict() for x in g],
                    }
                },
            }
            for label, g in grades.items()
        },
        "comparisons": [
            {
                "model": "adapter",
                "other": "base",
                "figures": preference_figures(pairs),
                "pairs": [p.as_dict() for p in pairs],
            }
        ],
    }


def test_report_renders_in_chromium_with_its_charts(tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("needs Chromium (.ci/run installs Debian's chromium)")
    paths = []
    for i, good in enumerate((1, 2)):
        p = tmp_path / f"v{i + 1}.json"
        p.write_text(json.dumps(doc(good, f"2026-12-0{i + 1}T10:00:00+00:00")))
        paths.append(str(p))
    page = tmp_path / "report.html"
    assert main(["report", *paths, "--out", str(page), "--title", "summarize adapter"]) == 0
    run = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*run, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<h1>summarize adapter</h1>" in dom
    for chart in ("trend", "grades-rubric", "preference"):
        start = dom.index(f'data-chart="{chart}"')
        assert "<svg" in dom[start : dom.index("</figure>", start)], chart
    assert dom.count("<h2>") == 5  # figures, over time, grade distributions, side by side, worst examples
    assert "misses a point &lt;b&gt;" in dom and "judge reply: missing reason" in dom  # reasons, escaped
    assert "good 0.50 / neutral 0.25 / poor 0.25" in dom  # v2 adapter: 2 good, 1 neutral, 1 unjudged (poor)
    shot = tmp_path / "page.png"
    subprocess.run([*run, "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()], timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200) and pixels.std() > 0.05  # something was drawn, not a blank page


def test_report_refuses_what_is_not_an_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "other"}')
    assert main(["report", str(bad), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not an evaluation document" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
