"""The traceback stored with a failed attempt, formatted cheaply.

Python 3.11's ``traceback.format_exception`` marks the failing expression of
each frame with ``^`` lines, and finds it by parsing the frame's source line
with ``ast`` and checking each file's modification time. For a worker whose
jobs all fail at once (a service they call is down) that was most of its CPU:
62 % of a drain of 20,000 failing no-op jobs, about 60 us a job on 2 cores.
This module writes the same text without the ``^`` lines: frames as
``walk_tb`` gives them (line numbers only) and the exception chain as Python
prints it.
"""

from __future__ import annotations

import builtins
import traceback
from typing import Any

# Python 3.11 and later; pgqueue runs on 3.10 too.
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", None)
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def format_exception(exc: BaseException) -> str:
    """``traceback.format_exception(exc)`` as one string, without the ``^``
    marks under each frame's line."""
    # Newest first, each with the sentence that leads to the one after it.
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    lead = ""
    while current is not None and id(current) not in seen:
        if _GROUP is not None and isinstance(current, _GROUP):
            # Rare, and laid out as a tree: Python's own formatter, marks and all.
            return "".join(traceback.format_exception(exc))
        seen.add(id(current))
        chain.append((current, lead))
        if current.__cause__ is not None:
            current, lead = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, lead = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for error, lead in reversed(chain):
        if error.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            frames = traceback.StackSummary.extract(
                traceback.walk_tb(error.__traceback__), lookup_lines=False
            )
            parts.extend(frames.format())
        parts.extend(traceback.format_exception_only(type(error), error))
        parts.append(lead)
    return "".join(parts)
