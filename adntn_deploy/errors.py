"""The project's error type: every message says what is wrong and how to fix it."""


class GeneratorError(ValueError):
    """A generator program, configuration, file or input is invalid; the message says what and how to fix it."""
