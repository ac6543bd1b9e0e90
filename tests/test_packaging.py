"""An installed onnxprune (a wheel, not an editable checkout) carries the demo's model and data."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from onnxprune import api

ROOT = Path(__file__).resolve().parents[1]


def test_a_source_checkout_finds_the_shipped_files_in_models():
    for name in api.SHIPPED:
        assert Path(api.shipped(name)).resolve() == (ROOT / "models" / name).resolve()


def test_the_wheel_carries_the_demo_files_and_shipped_finds_them(tmp_path):
    # Built from a copy of what the sdist holds, so that the build writes nothing into the checkout.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "onnxprune", source / "onnxprune", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (source / "models").mkdir()
    for name in api.SHIPPED:
        shutil.copy(ROOT / "models" / name, source / "models" / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build wheels here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    [wheel] = (tmp_path / "dist").glob("onnxprune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in api.SHIPPED:
            assert archive.read(f"onnxprune/assets/{name}") == (ROOT / "models" / name).read_bytes()
        assert not any(n.startswith("models/") for n in names)  # only the package goes in
        archive.extractall(tmp_path / "site")

    elsewhere = tmp_path / "elsewhere"  # no models/ here, and not the checkout
    elsewhere.mkdir()
    code = ("import onnxprune, onnxprune.api as api; print(onnxprune.__file__); "
            "print('\\n'.join(api.shipped(n) for n in api.SHIPPED))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    package, *found = proc.stdout.split()
    assert Path(package).is_relative_to(tmp_path / "site")  # the unpacked wheel, not the editable checkout
    assert found == [str(tmp_path / "site" / "onnxprune" / "assets" / name) for name in api.SHIPPED]
    # and the installed copy runs on them
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "eval", found[0], "--data", found[2], "--samples", "32",
                           "--json"], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert proc.returncode == 0 and '"accuracy"' in proc.stdout, proc.stderr
