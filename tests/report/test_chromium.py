"""The HTML report as a browser shows it: rendered by headless Chromium (Debian's ``chromium`` package), skipped
where it is not installed."""

import shutil
import struct
import subprocess

import pytest

from onnxprune.report.html import write_report
from tests.report.test_html import full_prune_run

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install "
                                                         "chromium); the report's rendering is not checked")


def chromium(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with its own profile folder (no sandbox: CI containers run as root)."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", *flags],
                          capture_output=True, text=True, check=False)


def test_the_report_renders_in_headless_chromium(models, tmp_path):
    page = write_report(tmp_path / "report.html", full_prune_run(models))
    shot = tmp_path / "shot.png"
    run = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", page.resolve().as_uri())
    assert shot.exists(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1200, 3000)
    assert len(data) > 60_000  # a blank page compresses to a few kilobytes; this one has tables and charts

    dom = chromium(tmp_path, "--dump-dom", page.resolve().as_uri()).stdout  # the page as the browser parsed it
    assert dom.count("<svg") >= 6 and "Predicted trade-off curve" in dom and "Measured latency" in dom
    assert "onnxprune-result" in dom
