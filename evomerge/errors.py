"""The one error type users see: a single line that says what is wrong and what to do."""


class EvomergeError(Exception):
    """A problem with the user's input (file, field, tensor). The CLI prints it and exits with 2."""


def describe(e: BaseException) -> str:
    """A foreign exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
