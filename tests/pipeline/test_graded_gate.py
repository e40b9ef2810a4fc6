"""A pipeline gate on graders' figures: a judge grades the new version and compares it side by side
with the base model; the evaluation is stored with the version and the report draws it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftlm.cli.main import main
from graftlm.pipeline.run import Pipeline
from graftlm.pipeline.spec import SpecError, load_spec
from graftlm.registry import PROD, Registry
from tests.eval.judge_stub import StubJudge, user_text
from tests.pipeline.test_pipeline import write_task

DIMS = ("composition", "comprehensiveness", "groundedness", "following_instructions", "harmfulness")
SPEC = """
base = "{base}"
[defaults.train]
rank = 4
lr = 0.01
epochs = 30
batch = 8
max_length = 64
[defaults.eval]
graders = ["rubric"]
judge_url = "{url}"
judge_model = "judge"
[[adapter]]
name = "alpha"
data = "data/alpha"
gate = {{ beat_base_by = 0.5, require = [{rules}] }}
"""


def judge(body: dict) -> str:
    """Prefers the answer that is the reference; grades an answer good when it is the reference."""
    q = user_text(body)
    if "[Answer A]" in q:
        a = q.split("[Answer A]\n")[1].split("\n[End of answer A]")[0]
        b = q.split("[Answer B]\n")[1].split("\n[End of answer B]")[0]
        winner = "A" if a == "the cat sat" and b != a else "B" if b == "the cat sat" and a != b else "tie"
        return json.dumps({"winner": winner, "reason": "the reference"})
    answer = q.split("[Assistant's answer]\n")[1].split("\n[End of answer]")[0]
    word = "good" if answer == "the cat sat" else "poor"
    return json.dumps(dict.fromkeys(DIMS, word) | {"reason": f"said {answer!r}"})


def workspace(tmp_path: Path, tiny_dir: Path, url: str, rules: str) -> Path:
    write_task(tmp_path, "alpha", "the cat sat")
    (tmp_path / "adapters.toml").write_text(SPEC.format(base=tiny_dir, url=url, rules=rules))
    return tmp_path / "adapters.toml"


def test_a_gate_on_judged_figures_publishes_the_evaluation(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with StubJudge(judge) as stub:
        spec = workspace(tmp_path, tiny_dir, stub.url, '"poor_rate <= 0.25", "win_rate_vs_base >= 0.75"')
        [out] = Pipeline(load_spec(spec)).run()
        assert out.action == "trained" and out.passed, out.gate
        assert any(g.startswith("poor_rate 0.0000 meets <= 0.25") for g in out.gate)
        assert any(g.startswith("win_rate_vs_base 1.0000 meets >= 0.75") for g in out.gate)
        # a stricter gate (not an input: the run is forced) grades a new version and keeps it out of prod
        spec.write_text(spec.read_text().replace('"poor_rate <= 0.25"', '"good_rate >= 1.5"'))
        [out2] = Pipeline(load_spec(spec)).run(force=True)
    assert out2.action == "trained" and not out2.passed
    assert "good_rate 1.0000 fails >= 1.5" in out2.gate
    reg = Registry(tmp_path / "registry")
    v1, _ = reg.versions("alpha")
    assert reg.aliases("alpha")[("alpha", PROD)] == v1.version
    assert v1.metrics["good_rate"] == 1.0 and v1.metrics["win_rate_vs_base"] == 1.0
    doc = reg.evaluation(v1)
    assert doc is not None and list(doc["contestants"]) == ["alpha", "base"]
    assert doc["contestants"]["alpha"]["graders"]["rubric"]["figures"]["good_rate"] == 1.0
    assert main(["registry", "show", "alpha@1", "--registry", str(tmp_path / "registry")]) == 0
    assert "alpha rubric: good_rate=1" in capsys.readouterr().out
    page = tmp_path / "report.html"
    argv = ["report", "--adapter", "alpha", "--registry", str(tmp_path / "registry"), "--out", str(page)]
    assert main(argv) == 0
    html = page.read_text()
    assert "alpha@1" in html and "alpha@2" in html and 'data-chart="trend"' in html


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ('"poor_rate =< 0.1"', "is not `FIGURE <=|>=|<|> NUMBER`"),
        ('"violation_rate <= 0.02"', "no configured grader gives violation_rate"),
        ('"win_rate_vs_prod >= 0.5", "win_rate_vs_base >= 0.5"', "both prod and base"),
    ],
)
def test_gate_rules_are_checked_when_the_spec_is_read(tmp_path: Path, tiny_dir: Path, rules: str, message: str) -> None:
    spec = workspace(tmp_path, tiny_dir, "http://127.0.0.1:1/v1", rules)
    with pytest.raises(SpecError, match="adapter 'alpha'") as e:
        load_spec(spec)
    assert message in str(e.value)


def test_a_judged_grader_needs_a_judge(tmp_path: Path, tiny_dir: Path) -> None:
    spec = workspace(tmp_path, tiny_dir, "http://127.0.0.1:1/v1", '"poor_rate <= 0.1"')
    spec.write_text(spec.read_text().replace('judge_url = "http://127.0.0.1:1/v1"\n', ""))
    with pytest.raises(SpecError, match="a judge grades here; set judge_url and judge_model"):
        load_spec(spec)


def test_a_per_dimension_figure_needs_the_rubric(tmp_path: Path, tiny_dir: Path) -> None:
    spec = workspace(tmp_path, tiny_dir, "http://127.0.0.1:1/v1", '"composition_good_rate >= 0.5"')
    load_spec(spec)  # the rubric grader is configured
    spec.write_text(spec.read_text().replace('graders = ["rubric"]', 'graders = ["instructions"]'))
    with pytest.raises(SpecError, match="no configured grader gives composition_good_rate"):
        load_spec(spec)
