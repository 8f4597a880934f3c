"""JSON checks for job arguments and results: reject early, naming the path."""

from __future__ import annotations

import json
import math
from typing import Any

from pgqueue.errors import ArgumentsNotSerializable

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

# One encoder for every call: json.dumps() with options builds a new encoder each
# time, which was most of the cost of checking an enqueue_many of small payloads.
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=True
)


def _is_plain(value: Any) -> bool:
    """True when ``value`` is JSON pgqueue accepts; no path is built (fast)."""
    kind = type(value)
    if kind is str:
        return "\x00" not in value
    if kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is dict:
        return all(
            type(key) is str and "\x00" not in key and _is_plain(item)
            for key, item in value.items()
        )
    if kind is list or kind is tuple:
        return all(_is_plain(item) for item in value)
    return False


def _problem(value: Any, path: str) -> str | None:
    """Describe the first value pgqueue refuses, with its path (slow, on error)."""
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{path} is {value}: JSON has no NaN/Infinity"
    if isinstance(value, str):
        if "\x00" in value:
            return f"{path} contains a NUL character, which PostgreSQL cannot store"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (
                    f"{path} has a key {key!r} of type {type(key).__name__}: "
                    "JSON object keys must be strings"
                )
            if "\x00" in key:
                return f"{path} has a key with a NUL character"
            found = _problem(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _problem(item, f"{path}[{index}]")
            if found:
                return found
        return None
    return (
        f"{path} is a {type(value).__name__}, which is not JSON "
        "(use str, int, float, bool, None, list or dict)"
    )


def dumps(value: Any, *, what: str = "args", max_bytes: int | None = None) -> str:
    """Return ``value`` as JSON text, or raise :class:`ArgumentsNotSerializable`.

    ``max_bytes`` bounds the UTF-8 size of the result (None: no limit).
    """
    try:
        return _dumps(value, what, max_bytes)
    except RecursionError:
        # The checks recurse: a few hundred levels of nesting, or a list that
        # holds itself, end here rather than as a bare RecursionError.
        raise ArgumentsNotSerializable(
            f"{what} is nested too deeply for Python to walk (or holds itself)"
        ) from None


def _dumps(value: Any, what: str, max_bytes: int | None) -> str:
    if not _is_plain(value):
        # Subclasses of str/int/dict (enums, OrderedDict...) fail the fast check
        # but may be fine: the slow walk decides, and names the path if not.
        problem = _problem(value, what)
        if problem:
            raise ArgumentsNotSerializable(problem)
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise ArgumentsNotSerializable(f"{what} is not JSON: {exc}") from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\udcff")
            raise ArgumentsNotSerializable(
                f"{what} holds text UTF-8 cannot encode (a lone surrogate, as "
                f"os.listdir gives for a name that is not UTF-8): {exc}"
            ) from None
    # UTF-8 takes at most 4 bytes a character: encode only when it could matter.
    if max_bytes is not None and len(text) * 4 > max_bytes:
        size = len(text.encode("utf-8"))
        if size > max_bytes:
            raise ArgumentsNotSerializable(
                f"{what} is {size} bytes of JSON, over the limit of {max_bytes}"
            )
    return text
