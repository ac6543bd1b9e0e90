"""Errors that reach the user as one line on stderr (never a traceback)."""


class OnnxPruneError(Exception):
    """A problem with the user's input or request, explained in one line."""


class MissingExtraError(OnnxPruneError):
    """An optional dependency is not installed; the message names the pip extra."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"this needs the optional module '{module}': pip install 'onnxprune[{extra}]'")
