"""Errors that reach the user as one line on stderr (never a traceback, unless ``--debug``), each kind with its
own exit status (``onnxprune.cli.main`` maps them; README, "exit status"):

- ``OnnxPruneError`` itself: bad usage or bad input (an unreadable or invalid model, bad data, a refused plan, a
  bad combination of flags or config keys): exit status 2, like argparse's own usage errors;
- ``VerificationFailed``: a rewritten, repaired or healed model failed verification; nothing was written: 1;
- ``MissingDependency`` (an optional package: torch, tensorrt, onnxruntime-gpu, Pillow) and
  ``UnavailableBackend`` (a backend or execution provider that cannot run here: no GPU, no CUDA provider): 3.
"""


class OnnxPruneError(Exception):
    """A problem with the user's input or request, explained in one line."""

    exit_status = 2


class VerificationFailed(OnnxPruneError):
    """A model onnxprune made failed verification (onnxprune.verify); nothing was written."""

    exit_status = 1


class MissingDependency(OnnxPruneError):
    """An optional package that the request needs is not installed (the message says how to install it)."""

    exit_status = 3


class UnavailableBackend(OnnxPruneError):
    """A latency backend or onnxruntime execution provider cannot run here (no GPU, provider missing)."""

    exit_status = 3
