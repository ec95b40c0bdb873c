"""One error type for every problem the user can fix: the CLI prints it on one line, exit 2."""


class CfdpoError(Exception):
    """A user-facing error: bad recipe, bad input file, missing model, inconsistent run directory."""
