"""`FasterPath`: timing a kernel against its PyTorch path per key and keeping the faster one."""

from __future__ import annotations

import time

import pytest

from graftlm.native import FasterPath


def _slow(value: str) -> str:
    time.sleep(0.003)
    return value


def _fast(value: str) -> str:
    return value


@pytest.mark.parametrize("kernel_is_faster", [True, False])
def test_it_keeps_the_faster_path_after_its_trials(kernel_is_faster: bool) -> None:
    calls: list[str] = []

    def kernel() -> str:
        calls.append("kernel")
        return _fast("k") if kernel_is_faster else _slow("k")

    def reference() -> str:
        calls.append("reference")
        return _slow("r") if kernel_is_faster else _fast("r")

    paths = FasterPath("test", trials=3)
    outs = [paths("key", kernel, reference) for _ in range(6)]
    # the trials alternate, starting with the kernel; each call's result is its own path's
    assert calls[:6] == ["kernel", "reference"] * 3 and outs == ["k", "r"] * 3
    assert paths.chosen == {"key": kernel_is_faster} and paths.times == {}
    calls.clear()
    assert [paths("key", kernel, reference) for _ in range(4)] == ["k" if kernel_is_faster else "r"] * 4
    assert calls == ["kernel" if kernel_is_faster else "reference"] * 4


def test_each_key_is_timed_and_decided_on_its_own() -> None:
    paths = FasterPath("test", trials=2)
    for _ in range(4):
        paths("a", _fast, _slow, "x")
        paths("b", _slow, _fast, "x")
    assert paths.chosen == {"a": True, "b": False}


def test_arguments_reach_both_paths() -> None:
    paths = FasterPath("test", trials=1)
    assert paths(1, lambda a, b: a + b, lambda a, b: a * b, 3, 4) == 7  # first trial: the kernel
    assert paths(1, lambda a, b: a + b, lambda a, b: a * b, 3, 4) == 12


@pytest.mark.parametrize(("setting", "want"), [("always", "k"), ("never", "r")])
def test_graftlm_kernel_skips_the_timing(monkeypatch: pytest.MonkeyPatch, setting: str, want: str) -> None:
    monkeypatch.setenv("GRAFTLM_KERNEL", setting)
    paths = FasterPath("test", trials=1)
    assert [paths("key", _slow, _fast, want) for _ in range(3)] == [want] * 3
    assert [paths("key", lambda v: "k", lambda v: "r", None) for _ in range(3)] == [want] * 3
    assert paths.chosen == {} and paths.times == {}


def test_a_bad_graftlm_kernel_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFTLM_KERNEL", "sometimes")
    paths = FasterPath("test")  # made at import: the error belongs to the first product, inside a command
    with pytest.raises(ValueError, match="GRAFTLM_KERNEL must be auto, always or never"):
        paths("key", _slow, _fast, None)


def test_an_assigned_force_wins_over_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFTLM_KERNEL", "sometimes")  # never read: benchmarks/decode.py forces a path this way
    paths = FasterPath("test", trials=1)
    paths.force = False
    assert [paths("key", lambda v: "k", lambda v: "r", None) for _ in range(2)] == ["r", "r"]
