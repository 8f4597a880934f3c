"""JSON checks name the offending path and refuse what Postgres cannot store."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgqueue import serialization
from pgqueue.errors import ArgumentsNotSerializable

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text().filter(lambda s: "\x00" not in s),
    lambda children: (
        st.lists(children)
        | st.dictionaries(st.text().filter(lambda s: "\x00" not in s), children)
    ),
    max_leaves=20,
)


@given(json_values)
def test_json_values_round_trip(value: Any) -> None:
    assert json.loads(serialization.dumps(value)) == value


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": [1, 2, {"b": math.nan}]}, "args['a'][2]['b']"),
        ({"a": {"b": b"bytes"}}, "args['a']['b']"),
        ({"a": {1, 2}}, "args['a']"),
        ({"a": "x\x00"}, "args['a']"),
    ],
)
def test_errors_name_the_path(value: Any, path: str) -> None:
    with pytest.raises(ArgumentsNotSerializable) as info:
        serialization.dumps(value)
    assert path in str(info.value)


def test_size_limit_counts_utf8_bytes() -> None:
    serialization.dumps({"s": "a" * 90}, max_bytes=100)
    with pytest.raises(ArgumentsNotSerializable, match="over the limit"):
        serialization.dumps({"s": "€" * 40}, max_bytes=100)


def test_nesting_too_deep_or_circular_is_a_clear_error() -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    circular: list[Any] = []
    circular.append(circular)
    for value in (deep, circular, {"a": circular}):
        with pytest.raises(ArgumentsNotSerializable, match="nested too deeply"):
            serialization.dumps({"v": value})
