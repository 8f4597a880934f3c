"""pgqueue.tracebacks writes what Python prints, without the ^ marks."""

from __future__ import annotations

import builtins
import re
import traceback

import pytest

from pgqueue.tracebacks import format_exception

MARKS = re.compile(r"^\s*[\^~]+\s*$")


def _python_prints(exc: BaseException) -> str:
    lines = "".join(traceback.format_exception(exc)).splitlines(keepends=True)
    return "".join(line for line in lines if not MARKS.match(line))


def _inner(n: int) -> None:
    if n:
        _inner(n - 1)
    raise KeyError("missing " + str(n))


def _caught(make: str) -> BaseException:
    try:
        if make == "cause":
            try:
                _inner(2)
            except KeyError as exc:
                raise RuntimeError("lookup failed") from exc
        elif make == "context":
            try:
                _inner(1)
            except KeyError:
                {}["during handling"]
        elif make == "suppressed":
            try:
                _inner(0)
            except KeyError:
                raise ValueError("plain") from None
        else:
            _inner(3)
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


@pytest.mark.parametrize("make", ["plain", "cause", "context", "suppressed"])
def test_the_text_is_pythons_without_the_marks(make: str) -> None:
    exc = _caught(make)
    text = format_exception(exc)
    assert text == _python_prints(exc)
    assert text.startswith("Traceback (most recent call last):\n")
    # The chain as Python keeps it: the KeyError is gone only when suppressed.
    assert ("raise KeyError" in text) is (make != "suppressed")


def test_an_exception_never_raised_has_no_traceback_lines() -> None:
    assert format_exception(ValueError("made, not raised")) == (
        "ValueError: made, not raised\n"
    )


GROUP = getattr(builtins, "ExceptionGroup", None)


def _group_failure(where: str) -> BaseException:
    assert GROUP is not None
    group = GROUP("several", [ValueError("inner a"), KeyError("inner b")])
    try:
        if where == "raised":
            raise group
        raise RuntimeError("the task group failed") from group
    except BaseException as exc:
        return exc


@pytest.mark.skipif(GROUP is None, reason="exception groups: Python 3.11+")
@pytest.mark.parametrize("where", ["raised", "cause"])
def test_exception_groups_show_every_exception_inside(where: str) -> None:
    text = format_exception(_group_failure(where))
    assert "ValueError: inner a" in text and "KeyError: 'inner b'" in text
