"""The files a run writes. Each is written atomically (under a temporary name in its own folder, then renamed with
``os.replace``), so a crash or Ctrl-C never leaves half a file, and each is remembered while ``run_outputs`` is
open, so that a run that fails or is interrupted removes what it had already written: a model without its plan is
never left behind (README, "exit status": nothing written on a failure; status 130 on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

_written: list[Path] | None = None  # the open run's outputs, in the order written; None outside ``run_outputs``


def record(path: str | os.PathLike[str]) -> None:
    """Remember ``path`` as an output of the open run (nothing outside ``run_outputs``). Called just before the
    file is renamed into place, so that an interrupt between the two still removes it."""
    if _written is not None and Path(path) not in _written:
        _written.append(Path(path))


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Write ``path`` by ``write(temporary path)`` in the same folder, then rename it into place; the temporary
    file is removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name, created by ``write`` itself (so the file gets the usual permissions, not mkstemp's 0600)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        record(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def run_outputs() -> Iterator[list[Path]]:
    """Remember the files written inside (``record``); when the block raises (an error, Ctrl-C), remove them
    before the exception goes on. A block that returns keeps them (a missed target still writes its outputs)."""
    global _written
    outer, _written = _written, []
    written = _written
    try:
        yield written
    except BaseException:
        remove(written)
        raise
    finally:
        _written = outer
    if outer is not None:  # a run inside a run: its files are the outer run's too
        outer.extend(p for p in written if p not in outer)


def remove(paths: list[Path]) -> None:
    """Remove ``paths`` (already gone ones are fine), newest first."""
    for path in reversed(paths):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
