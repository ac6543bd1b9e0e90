"""Errors that reach the user as one line on stderr (never a traceback)."""


class OnnxPruneError(Exception):
    """A problem with the user's input or request, explained in one line."""

