"""The judge client against a real HTTP endpoint: strict parsing, retries, back-off, clear errors."""

from __future__ import annotations

import json
import socket

import pytest

from graftlm.errors import ConfigError
from graftlm.eval.grade import Case
from graftlm.eval.judge import Judge, JudgeConfig, JudgeUnavailableError, MalformedReplyError, PartialResults, Reply
from graftlm.eval.rubric import SUMMARY, RubricGrader
from tests.eval.judge_stub import StubJudge, user_text

REPLY = Reply("t", {"grade": ("good", "neutral", "poor")})
GOOD = {d.name: "good" for d in SUMMARY.dimensions} | {"reason": "fine"}


def judge(url: str, **kw: object) -> tuple[Judge, list[float]]:
    slept: list[float] = []
    return Judge(JudgeConfig(url=url, model="m", **kw), sleep=slept.append), slept  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        '{"grade": "good", "reason": "ok"}',
        ' \n{"grade": "Good", "reason": "ok"}\n',
        '```json\n{"grade": "good", "reason": "ok"}\n```',
    ],
)
def test_a_reply_that_is_exactly_the_object_parses(text: str) -> None:
    assert REPLY.parse(text) == {"grade": "good", "reason": "ok"}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('Sure! {"grade": "good", "reason": "ok"}', "not one JSON object"),
        ('{"grade": "good", "reason": "ok"} I hope this helps', "not one JSON object"),
        ('{"grade": "good"}', "missing reason"),
        ('{"reason": "ok"}', "missing grade"),
        ('{"grade": "great", "reason": "ok"}', "grade is 'great'"),
        ('{"grade": 1, "reason": "ok"}', "grade is 1"),
        ('{"grade": "good", "reason": 5}', "reason is 5"),
        ('["good"]', "a JSON list"),
        ("", "not one JSON object"),
    ],
)
def test_malformed_replies_are_refused(text: str, why: str) -> None:
    with pytest.raises(MalformedReplyError, match=why):
        REPLY.parse(text)


def test_a_malformed_reply_is_asked_again_with_the_error_then_accepted() -> None:
    replies = iter(['{"grade": "excellent", "reason": "x"}', '{"grade": "poor", "reason": "short"}'])
    with StubJudge(lambda body: next(replies)) as stub:
        j, _ = judge(stub.url, response_format="json_schema")
        assert j.ask("sys", "question", REPLY) == {"grade": "poor", "reason": "short"}
    first, second = stub.requests
    assert first["path"] == "/v1/chat/completions" and first["temperature"] == 0.0
    assert first["response_format"]["type"] == "json_schema"
    assert first["response_format"]["json_schema"]["schema"]["properties"]["grade"]["enum"] == [
        "good",
        "neutral",
        "poor",
    ]
    assert "grade is 'excellent'" in second["messages"][-1]["content"]  # the correction quotes the error
    assert second["messages"][-2] == {"role": "assistant", "content": '{"grade": "excellent", "reason": "x"}'}


def test_replies_that_never_parse_are_failures_never_passes() -> None:
    with StubJudge(lambda body: '{"composition": "good"}') as stub:
        j, _ = judge(stub.url, reply_tries=2)
        case = Case([{"role": "user", "content": "Summarize: a b c"}], "a")
        [grade] = RubricGrader(SUMMARY, j).grade([case], ["a b"])
    assert grade.failed and grade.label == "failed" and grade.score == 0.0
    assert "after 2 tries" in grade.reasons[0] and "missing comprehensiveness" in grade.reasons[0]
    assert len(stub.requests) == 2


def test_the_rubric_grade_follows_the_dimensions() -> None:
    def answer(body: dict) -> str:
        poor = "hallucinated" in user_text(body)
        return json.dumps(GOOD | ({"groundedness": "poor", "reason": "made up"} if poor else {}))

    with StubJudge(answer) as stub:
        j, _ = judge(stub.url)
        cases = [Case([{"role": "user", "content": "Summarize: x"}])] * 2
        good, poor = RubricGrader(SUMMARY, j).grade(cases, ["a fine summary", "a hallucinated summary"])
    assert (good.label, good.score, poor.label, poor.score) == ("good", 1.0, "poor", 0.0)
    assert poor.dimensions["groundedness"] == "poor" and poor.reasons == ["made up"]
    assert "Summarize: x" in user_text(stub.requests[0]) and "comprehensiveness" in user_text(stub.requests[0])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_endpoint_that_is_down_is_retried_with_back_off_then_named() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    j, slept = judge(url, tries=4, backoff=0.5)
    with pytest.raises(
        JudgeUnavailableError,
        match=r"judge 'm' at http://127\.0\.0\.1:\d+/v1/chat/completions did not answer after 4 tries: ConnectError",
    ):
        j.ask("s", "q", REPLY)
    assert slept == [0.5, 1.0, 2.0] and j.calls == 4


def test_a_slow_endpoint_times_out_and_is_retried() -> None:
    with StubJudge(lambda body: '{"grade": "good", "reason": "late"}', delay=0.6) as stub:
        j, slept = judge(stub.url, tries=2, timeout=0.2)
        with pytest.raises(JudgeUnavailableError, match="after 2 tries: ReadTimeout"):
            j.ask("s", "q", REPLY)
    assert len(slept) == 1


def test_busy_then_answering_succeeds() -> None:
    replies = iter([(503, "overloaded"), (429, "slow down"), '{"grade": "neutral", "reason": "ok"}'])
    with StubJudge(lambda body: next(replies)) as stub:
        j, slept = judge(stub.url, backoff=0.1)
        assert j.ask("s", "q", REPLY)["grade"] == "neutral"
    assert slept == [0.1, 0.2] and len(stub.requests) == 3


def test_a_refusal_stops_at_once_and_sends_the_key() -> None:
    with StubJudge(lambda body: (401, '{"error": "bad key"}')) as stub:
        j, slept = judge(stub.url, api_key="sk-test")
        with pytest.raises(JudgeUnavailableError, match="refused the request: HTTP 401"):
            j.ask("s", "q", REPLY)
    assert slept == [] and stub.requests[0]["auth"] == "Bearer sk-test"


def test_map_keeps_what_was_graded_before_the_judge_went_away() -> None:
    served = []

    def answer(body: dict) -> str | tuple[int, str]:
        served.append(1)
        return (500, "dead") if len(served) > 2 else json.dumps(GOOD)

    with StubJudge(answer) as stub:
        j, _ = judge(stub.url, tries=2, backoff=0.0, concurrency=1)
        cases = [Case([{"role": "user", "content": f"text {i}"}]) for i in range(5)]
        with pytest.raises(PartialResults) as e:
            RubricGrader(SUMMARY, j).grade(cases, ["s"] * 5)
    assert [g.label for g in e.value.results] == ["good", "good"]
    assert "did not answer after 2 tries: HTTP 500" in str(e.value)


def test_judge_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="--judge-url and --judge-model"):
        JudgeConfig(url="http://x/v1")
    with pytest.raises(ConfigError, match="not an http"):
        JudgeConfig(url="localhost:8000", model="m")
