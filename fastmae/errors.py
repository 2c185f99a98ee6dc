"""Errors that the CLI reports as one line (no traceback)."""


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
