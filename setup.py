"""The project is declared in pyproject.toml; this file only ships the demo's files inside the package.

The demo's model and data live once, in models/ (where the training scripts write them and the tests read them).
A built wheel carries a copy of them in onnxprune/assets/, so that an installed onnxprune runs ``onnxprune demo``
from any folder (onnxprune.api.shipped looks there). MANIFEST.in puts them in the sdist, which wheels built from an
sdist start from. An editable install reads them from the checkout instead.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSETS = ("resnet56.onnx", "cifar10_calib512.npz", "cifar10_test1000.npz")  # onnxprune.api.SHIPPED


class BuildWithAssets(build_py):
    """build_py, then models/<asset> copied to onnxprune/assets/<asset> in the build."""

    def _assets(self) -> list[tuple[Path, Path]]:
        if getattr(self, "editable_mode", False):
            return []
        root = Path(__file__).resolve().parent
        return [(root / "models" / name, Path(self.build_lib) / "onnxprune" / "assets" / name) for name in ASSETS]

    def run(self) -> None:
        super().run()
        for source, target in self._assets():
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [str(target) for _, target in self._assets()]


setup(cmdclass={"build_py": BuildWithAssets})
