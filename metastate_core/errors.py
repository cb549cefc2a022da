"""The library's error types: every failure a user can cause is one of these."""


class MetaStateError(Exception):
    """Base of every error this library raises on bad input; the CLI prints it as one line."""
