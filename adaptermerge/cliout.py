"""Output helpers shared by the commands (cli.py, analyze_cli.py): plain text from files, JSON on stdout, and a
failing stdout as one line. rich and the standard library only."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
from typing import Any

from rich.text import Text

from .errors import OutputError, printable


def plain(value: Any) -> Text:
    """Text from a file or the command line (tensor, module and file names, metadata, config values) as a rich
    ``Text``: never read as markup (``[/x]`` is shown, not parsed), control characters and lone surrogates escaped
    (terminal escape codes in a tensor name are shown, not obeyed)."""
    return Text(printable(str(value)))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: JSON has no NaN (``json.dumps`` would write a bare
    ``NaN`` that JSON parsers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class StdoutError(OutputError):
    """Standard output could not be written (a full disk behind ``> file``, a closed pipe)."""


@contextlib.contextmanager
def stdout_guard(done: str = ""):
    """Turn a failed write to stdout (``> /dev/full``, a closed pipe) into one-line :class:`StdoutError` (exit 5)
    instead of a traceback. ``done`` says what was completed anyway (e.g. the merged adapter was written)."""
    try:
        yield
        sys.stdout.flush()
    except OSError as e:
        _silence_stdout()
        if e.errno == errno.EPIPE:
            raise StdoutError(f"standard output: the reader closed the pipe{done}") from None
        raise StdoutError(f"standard output: write failed: {e.strerror or e}{done}") from None


def _silence_stdout() -> None:
    """After stdout failed, point it at /dev/null: the interpreter's final flush would fail again (and turn the
    exit status into 120)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def print_json(obj: Any, done: str = "", indent: int | None = 2) -> None:
    """Write ``obj`` as JSON on stdout (ASCII, NaN/Inf as null), guarded by :func:`stdout_guard`."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"
    with stdout_guard(done):
        sys.stdout.write(text)
