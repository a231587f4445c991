"""Errors the command line reports as one line with exit code 2 (bad input, not a crash)."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unsupported model, an invalid option."""


class CheckFailed(Exception):
    """A measured check fell short of a threshold the user set (exit code 1)."""
