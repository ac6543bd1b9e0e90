"""Progress bars on the long stages (activation capture, scoring, latency timing, the speed-up search, repair
fitting, healing, gated training; README, the paragraph after "exit status"): the one place that decides
whether a bar is drawn. Bars go to stderr, never stdout (``--json`` keeps stdout to itself); they are drawn only
when stderr is a terminal and bars are on (``--quiet`` turns them off: ``set_enabled(False)``, set by the CLI).
Without a bar, ``progress`` hands back the iterable itself, so callers see the same items either way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

_enabled = True  # the CLI's --quiet turns bars off for the run


def set_enabled(on: bool) -> None:
    """Bars on (the default; still only on a terminal) or off (``--quiet``)."""
    global _enabled
    _enabled = on


def bars_shown() -> bool:
    """Whether a bar would be drawn now: bars are on and stderr is a terminal."""
    stream = sys.stderr
    try:
        return _enabled and stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterable[T]:
    """``iterable`` with a bar on stderr (``desc``, ``total`` items) while it is consumed; the bar is removed when
    the stage ends. Without a bar (``bars_shown`` false): ``iterable`` itself."""
    if not bars_shown():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def write_line(text: str) -> None:
    """One line on stderr that does not tear a bar being drawn (log messages go through here)."""
    if bars_shown():
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr)


def batches(data, size: int, desc: str) -> Iterable:
    """``data.batches(size)`` (an onnxprune.data.sources.Dataset) with a bar counting them."""
    step = max(data.static_batch or size, 1)
    return progress(data.batches(size), total=-(-len(data) // step), desc=desc)
