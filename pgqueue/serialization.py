"""JSON checks for job arguments and results: reject early, naming the path."""

from __future__ import annotations

import json
import math
from typing import Any

from pgqueue.errors import ArgumentsNotSerializable

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


def _check(value: Any, path: str) -> None:
    # Iterative would be faster on deep data; job payloads are shallow.
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentsNotSerializable(
                f"{path} is {value}: JSON has no NaN/Infinity"
            )
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise ArgumentsNotSerializable(
                f"{path} contains a NUL character, which PostgreSQL cannot store"
            )
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ArgumentsNotSerializable(
                    f"{path} has a key {key!r} of type {type(key).__name__}: "
                    "JSON object keys must be strings"
                )
            if "\x00" in key:
                raise ArgumentsNotSerializable(f"{path} has a key with a NUL character")
            _check(item, f"{path}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
        return
    raise ArgumentsNotSerializable(
        f"{path} is a {type(value).__name__}, which is not JSON "
        "(use str, int, float, bool, None, list or dict)"
    )


def dumps(value: Any, *, what: str = "args", max_bytes: int | None = None) -> str:
    """Return ``value`` as JSON text, or raise :class:`ArgumentsNotSerializable`.

    ``max_bytes`` bounds the UTF-8 size of the result (None: no limit).
    """
    _check(value, what)
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # UTF-8 takes at most 4 bytes a character: encode only when it could matter.
    if max_bytes is not None and len(text) * 4 > max_bytes:
        size = len(text.encode("utf-8"))
        if size > max_bytes:
            raise ArgumentsNotSerializable(
                f"{what} is {size} bytes of JSON, over the limit of {max_bytes}"
            )
    return text
