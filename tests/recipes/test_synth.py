"""`graftlm synth`: rejection sampling keeps exactly the passing answers, resumes, and asks real endpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from graftlm.errors import ConfigError
from graftlm.eval.grade import Case
from graftlm.eval.rewards import Reward, RewardError
from graftlm.recipes.synth import Answer as A
from graftlm.recipes.synth import SynthConfig, Teacher, choose, synthesize
from tests.eval.judge_stub import StubJudge, user_text

SCORER = '''
calls = {"n": 0, "fail_at": -1}

def length(prompt, output, **fields):
    """Longer is better; an odd length fails (about half the answers of a random model)."""
    calls["n"] += 1
    if calls["n"] == calls["fail_at"]:
        raise RuntimeError("scorer down")
    return (len(output) % 2 == 0) * len(output) / 10
'''


@pytest.fixture
def scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    (tmp_path / "synthscore.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("synthscore", None)
    import synthscore  # type: ignore[import-not-found]

    return synthscore


def test_choose_keeps_the_best_passing_answer_or_none() -> None:
    case = Case(
        [{"role": "user", "content": "Say hi in lowercase."}], fields={"checks": [{"check": "case", "case": "lower"}]}
    )
    reward = Reward.parse("instructions")
    kept, counts = choose(case, {"a": [A("Hi there"), A("hi there")], "b": [A("hello"), A("HELLO")]}, reward)
    assert kept is not None and kept["messages"][-1] == {"role": "assistant", "content": "hi there"}
    assert kept["teacher"] == "a"  # ties go to the first teacher's first passing answer
    assert counts == {"a": (1, 2), "b": (1, 2)}
    none, counts = choose(case, {"a": [A("Hi"), A("HI")]}, reward)
    assert none is None and counts == {"a": (0, 2)}
    # an answer the token limit cut off is not finished: it fails unless asked for
    cut = {"a": [A("hi, and then", cut=True)]}
    assert choose(case, cut, reward)[0] is None and choose(case, cut, reward, keep_cut=True)[0] is not None


def test_the_highest_reward_among_passing_answers_wins(scorer) -> None:  # type: ignore[no-untyped-def]
    case = Case([{"role": "user", "content": "Say something."}])
    reward = Reward.parse("synthscore:length", min_score=0.5)  # even lengths from 6 characters pass
    answers = {"a": [A("abcd"), A("abcdefgh"), A("abcdef")], "b": [A("abcdefghijklmnopqrstuvwxyz")]}
    kept, counts = choose(case, answers, reward)
    assert kept is not None and kept["teacher"] == "b" and counts == {"a": (2, 3), "b": (1, 1)}


def _prompts(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"Summarize this email number {i}."} for i in range(n)] + [
        {"prompt": "summarize  THIS email number 0."}
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_a_run_keeps_passing_answers_reports_per_teacher_and_resumes(tiny_dir: Path, tmp_path: Path, scorer) -> None:  # type: ignore[no-untyped-def]
    prompts = _prompts(tmp_path)
    config = SynthConfig(k=3, max_new_tokens=6, chunk=2, keep_cut=True)  # 6 tokens cut most answers
    reward = Reward.parse("synthscore:length", min_score=1e-9)  # even lengths pass
    straight = tmp_path / "straight.jsonl"
    report = synthesize(str(tiny_dir), prompts, [Teacher.parse("base")], reward, straight, config)
    assert report["prompts"] == 5 and report["duplicates_left_out"] == 1
    lines = [json.loads(x) for x in straight.read_text().splitlines()]
    assert report["kept"] == len(lines) and 0 < len(lines) <= 5
    for line in lines:  # every kept answer passes
        assert len(line["messages"][-1]["content"]) % 2 == 0
    t = report["teachers"]["base"]
    assert t["proposed"] == 15 and t["passed"] >= len(lines)
    assert json.loads((tmp_path / "straight.jsonl.report.json").read_text())["kept"] == len(lines)

    # the scorer breaks in the second round: what the first round kept stays, and a rerun finishes the job
    scorer.calls.update(n=0, fail_at=8)
    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(RewardError, match="scorer down"):
        synthesize(str(tiny_dir), prompts, [Teacher.parse("base")], reward, resumed, config)
    progress = tmp_path / "resumed.jsonl.progress.jsonl"
    assert len(progress.read_text().splitlines()) == 1 + 2  # the settings and the first round's two prompts
    scorer.calls.update(fail_at=-1)
    synthesize(str(tiny_dir), prompts, [Teacher.parse("base")], reward, resumed, config)
    assert resumed.read_text() == straight.read_text() and not progress.exists()

    # other settings do not mix with an unfinished run
    scorer.calls.update(n=0, fail_at=2)
    with pytest.raises(RewardError):
        synthesize(str(tiny_dir), prompts, [Teacher.parse("base")], reward, tmp_path / "x.jsonl", config)
    with pytest.raises(ConfigError, match="other settings"):
        synthesize(str(tiny_dir), prompts, [Teacher.parse("base")], reward, tmp_path / "x.jsonl", SynthConfig(k=2))


def test_an_endpoint_teacher_is_asked_k_times_with_sampling_settings(tiny_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path, 2)

    def answer(body: dict) -> str:
        return "all lowercase here" if "1" in user_text(body) else "Not Lowercase"

    checks = [{"check": "case", "case": "lower"}]
    with_checks = tmp_path / "checked.jsonl"
    with_checks.write_text(
        "".join(json.dumps(json.loads(x) | {"checks": checks}) + "\n" for x in prompts.read_text().splitlines())
    )
    with StubJudge(answer) as stub:
        teacher = Teacher.parse(f"{stub.url}#big-model")
        report = synthesize(
            str(tiny_dir),
            with_checks,
            [teacher],
            Reward.parse("instructions"),
            tmp_path / "o.jsonl",
            SynthConfig(k=2, temperature=0.7),
        )
        bodies = stub.requests
    assert len(bodies) == 4 and {b["model"] for b in bodies} == {"big-model"}
    assert all(b["temperature"] == 0.7 and b["path"] == "/v1/chat/completions" for b in bodies)
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["messages"][-1]["content"] for x in lines] == ["all lowercase here"]
    assert report["teachers"][teacher.spec]["pass_rate"] == 0.5


def test_bad_teachers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="URL#MODEL"):
        Teacher.parse("http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="not an adapter folder"):
        Teacher.parse(str(tmp_path))


def test_the_command_line_writes_data_that_graftlm_train_reads(tiny_dir: Path, tmp_path: Path, scorer) -> None:  # type: ignore[no-untyped-def]
    from graftlm.cli.main import main

    out = tmp_path / "data.jsonl"
    args = ["synth", "-m", str(tiny_dir), "--prompts", str(_prompts(tmp_path)), "--out", str(out)]
    assert (
        main(
            [
                *args,
                "--grader",
                "synthscore:length",
                "--min-score",
                "0.01",
                "--keep-cut",
                "--k",
                "2",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    assert out.read_text() and (tmp_path / "data.jsonl.report.json").is_file()
    assert (
        main(["train", "-m", str(tiny_dir), "--data", str(out), "--out", str(tmp_path / "a"), "--max-steps", "1"]) == 0
    )
    assert main([*args, "--teacher", str(tmp_path / "nowhere")]) == 2  # a clear error, not a traceback
