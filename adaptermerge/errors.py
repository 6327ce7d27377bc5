"""Error types and the exit codes the CLI maps them to.

Every error the library raises on purpose is an :class:`AdapterMergeError`. Its message is one line that names
the file, tensor or parameter at fault; the CLI prints ``error: <message>`` and exits with ``exit_code``.

=====  ==========================  =====================================================================
code   class                       meaning
=====  ==========================  =====================================================================
1      (any other exception)       a bug in adaptermerge: please report it with the traceback
2      ParameterError              bad method, parameter, weight count, option combination (nothing read)
3      InputError                  an input is missing, unreadable, corrupt, unsafe or not a LoRA adapter
4      IncompatibleInputsError     inputs are valid alone but cannot be merged together (shapes disagree)
5      OutputError                 the output exists (no --force), is not writable, or the write failed
=====  ==========================  =====================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: The longest error message: values echoed from hostile files are cut much shorter (:func:`shorten`); this is the
#: last line of defence for everything else (a message naming several long paths stays whole).
MAX_MESSAGE_CHARS = 4000

# C0/C1 control characters, DEL and lone surrogates: never written raw to a terminal or a log.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape codes included) and lone surrogates written as escapes
    (``\\x1b``, ``\\ud800``): what comes from a file is shown as text, never interpreted by the terminal, and can
    always be encoded."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1] if m.group() not in "\n\t" else " ", text)


def shorten(value: Any, limit: int = 60) -> str:
    """``repr(value)`` (``str`` for paths), made printable and cut to ``limit`` characters: the one helper for
    echoing a value from a file or a config in a message, so a hostile input cannot turn an error into megabytes."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit cannot even be printed
        text = f"<int of {value.bit_length()} bits>"
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    if len(text) > 4 * limit:
        text = text[: 4 * limit]
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(message: Any) -> str:
    """A message as adaptermerge prints it: one line, printable, at most :data:`MAX_MESSAGE_CHARS` characters."""
    text = printable(" ".join(str(message).split()))
    if len(text) > MAX_MESSAGE_CHARS:
        half = MAX_MESSAGE_CHARS // 2 - 20
        text = f"{text[:half]} …[{len(text) - 2 * half} characters cut]… {text[-half:]}"
    return text


class AdapterMergeError(Exception):
    """Base class of every error adaptermerge raises on purpose."""

    exit_code = 1

    def __init__(self, message: str):
        # One line, always: a multi-line message would break log parsers and the CLI contract.
        super().__init__(one_line(message))


class ParameterError(AdapterMergeError, ValueError):
    """A method name, parameter value or option is invalid. Raised before any tensor is read."""

    exit_code = 2


class InputError(AdapterMergeError):
    """An input file or directory is missing, unreadable, corrupt, unsafe, or not a LoRA adapter."""

    exit_code = 3


class IncompatibleInputsError(AdapterMergeError):
    """Inputs that are each valid cannot be merged together (e.g. one module has different shapes)."""

    exit_code = 4


class OutputError(AdapterMergeError):
    """The output cannot be written: it exists without force, its folder is not writable, or the write failed."""

    exit_code = 5


# ------------------------------------------------------------------------------------------ naming options in messages
# The same check runs under the command line and under the Python API; its message names the option the way the
# caller writes it: "--force" on the command line, "force=True" in Python. The CLI switches the wording for the
# duration of a command (a context variable, so threads and other callers keep the Python wording).
_CLI_WORDING: ContextVar[bool] = ContextVar("adaptermerge_cli_wording", default=False)


def option(cli: str, python: str) -> str:
    """``cli`` while a command-line command runs, else ``python``: e.g. ``option("--force", "force=True")``."""
    return cli if _CLI_WORDING.get() else python


@contextmanager
def cli_wording() -> Iterator[None]:
    """Within this block, messages name options as command-line flags."""
    token = _CLI_WORDING.set(True)
    try:
        yield
    finally:
        _CLI_WORDING.reset(token)
