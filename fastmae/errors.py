"""Errors that the CLI reports as one line (no traceback)."""


class FastMAEError(ValueError):
    """Bad user input (a config value, a path, a model name). The message is a complete one-line explanation."""
