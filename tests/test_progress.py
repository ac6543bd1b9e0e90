"""Progress bars (onnxprune.progress): on stderr only when it is a terminal and --quiet is not given, never on
stdout, and the wrapped stages see the same items."""

import io
import json
import sys
from pathlib import Path

import pytest

from onnxprune import progress as progress_module
from onnxprune.cli import build_parser, main
from onnxprune.config import subparser
from onnxprune.progress import bars_shown, progress

ROOT = Path(__file__).resolve().parents[1]
RESNET20, CALIB = ROOT / "models" / "resnet20.onnx", ROOT / "models" / "cifar10_calib512.npz"


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def bars_on(monkeypatch):
    monkeypatch.setattr(progress_module, "_enabled", True)


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    items = [3, 1, 2]
    assert not bars_shown()  # pytest's captured stderr is no terminal
    assert progress(items, desc="x") is items
    assert list(progress(iter(items), total=3, desc="x")) == items
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal_yields_the_same_items(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert bars_shown()
    assert list(progress(range(5), total=5, desc="counting")) == list(range(5))
    assert list(progress((c for c in "abc"), desc="letters")) == ["a", "b", "c"]
    assert "counting" in terminal.getvalue() and "/5" in terminal.getvalue()
    assert capsys.readouterr().out == ""  # never on stdout


def test_set_enabled_false_turns_bars_off_even_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress_module.set_enabled(False)
    items = [1, 2]
    assert not bars_shown() and progress(items, desc="x") is items
    progress_module.write_line("a message")
    assert terminal.getvalue() == "a message\n"


def test_every_verb_accepts_quiet_before_or_after_it():
    parser = build_parser()
    for verb in ("analyze", "apply", "eval", "score", "prune", "latency", "heal", "train-prune", "repair", "bench",
                 "demo"):
        assert "--quiet" in subparser(parser, verb).format_help(), verb
    assert parser.parse_args(["--quiet", "analyze", "m.onnx"]).quiet
    assert parser.parse_args(["analyze", "m.onnx", "--quiet"]).quiet
    assert not parser.parse_args(["analyze", "m.onnx"]).quiet
    assert "--quiet" in parser.format_help()


def _score(monkeypatch, *flags: str) -> str:
    """stderr of ``score --json`` on a terminal."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    status = main(["score", str(RESNET20), "--data", str(CALIB), "--samples", "32", "--batch", "8", "--json", *flags])
    assert status == 0
    return terminal.getvalue()


def test_score_draws_its_bar_on_a_terminal_stderr_and_keeps_stdout_to_the_json(monkeypatch, capsys):
    err = _score(monkeypatch)
    assert "scoring" in err and "/4" in err
    out = capsys.readouterr().out
    assert json.loads(out)["schema_version"] == 1 and out.count("\n") == 1


def test_quiet_turns_the_bars_and_the_progress_messages_off(monkeypatch, capsys):
    err = _score(monkeypatch, "--quiet")
    assert err == ""
    assert json.loads(capsys.readouterr().out)["blocks"]
    err = _score(monkeypatch)  # the next run in the same process draws again
    assert "scoring" in err


def test_no_bar_from_the_command_line_when_stderr_is_not_a_terminal(capsys):
    assert main(["score", str(RESNET20), "--data", str(CALIB), "--samples", "32", "--batch", "8", "--json"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err
    assert json.loads(captured.out)["blocks"]
