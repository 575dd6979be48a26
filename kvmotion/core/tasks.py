"""Structured concurrency helpers: what a TaskGroup's failure means to a caller expecting one error."""

from __future__ import annotations


def leaf_errors(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in `group`, nested groups flattened, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaf_errors(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def sole_error(group: BaseExceptionGroup) -> BaseException:
    """The error to raise for a failed TaskGroup: its first leaf (a KvmotionError stays one line for
    the CLI); the others, when there are several, are named in its notes."""
    first, *rest = leaf_errors(group)
    for other in rest:
        first.add_note(f"also: {type(other).__name__}: {other}")
    return first
