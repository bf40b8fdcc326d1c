"""The one error type users see: a single line that says what is wrong and what to do."""


class EvomergeError(Exception):
    """A problem with the user's input (file, field, tensor). The CLI prints it and exits with 2."""
