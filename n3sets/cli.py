"""What every command-line program of this project shares: one error class and one-line reports.

A program raises :class:`UsageError` (or lets a library ``ValueError`` / ``FileNotFoundError``
/ ``OSError`` through) for bad input; its ``main`` prints :func:`one_line` of it on stderr as
``PROGRAM: error: ...`` and exits with status 2.
"""
from __future__ import annotations

__all__ = ["UsageError", "one_line"]


class UsageError(ValueError):
    """A bad argument or input: reported on one line, exit code 2."""


def one_line(exc: BaseException) -> str:
    """The first line of an error message (torch's unpickling errors run over many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] + (" [...]" if len(lines) > 1 else "")
