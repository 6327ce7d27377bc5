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

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class AdapterMergeError(Exception):
    """Base class of every error adaptermerge raises on purpose."""

    exit_code = 1

    def __init__(self, message: str):
        # One line, always: a multi-line message would break log parsers and the CLI contract.
        super().__init__(" ".join(str(message).split()))


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
