"""Errors that the CLI reports as one line (no traceback), and the one way an exception becomes one line."""


class FastMAEError(ValueError):
    """Bad user input (a config value, a path, a model name). The message is a complete one-line explanation.
    The CLI exits with ``exit_code`` (2)."""

    exit_code = 2


class RunFault(FastMAEError):
    """A run stopped by a fault of its environment (a lost peer, a dying data-loader worker, a full disk), after saving
    what could be saved; the message says what happened and what was kept. The CLI exits with 1, so that torchrun (or
    a job script) restarts it."""

    exit_code = 1


class NoRoom(RunFault):
    """A file could not be written for lack of room (disk full, quota, file size limit)."""


def one_line(exc: BaseException, *, last: bool = False, typed: bool = False, limit: int = 200) -> str:
    """``exc`` as one line, for logs, results rows and error lines: the first non-empty line of its message (``last``:
    the last one, where torch puts the cause), cut at ``limit`` characters, after its type's name when ``typed``; its
    type's name alone when the message is empty."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = (lines[-1] if last else lines[0])[:limit] if lines else ""
    if typed or not text:
        return f"{type(exc).__name__}: {text}".rstrip(": ")
    return text
