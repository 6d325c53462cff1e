"""Build hooks: ship ``optimum_splitquant-autoload.pth`` at the root of site-packages.

Everything else lives in ``pyproject.toml``. The ``.pth`` file runs ``_optimum_splitquant_autoload.install()``
at interpreter start (see that module). A regular wheel gets it from ``build_py``, which copies it to
the root of the build folder; an editable wheel (PEP 660) leaves that folder out, so ``editable_wheel``
also writes it into the unpacked wheel, next to the files setuptools puts there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "optimum_splitquant-autoload.pth"
HERE = Path(__file__).resolve().parent


class BuildPyWithPth(build_py):
    """``build_py`` that also places the start-up ``.pth`` file at the root of ``build_lib``."""

    def run(self) -> None:
        super().run()
        Path(self.build_lib).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / PTH, Path(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]

    def get_source_files(self) -> list[str]:
        return [*super().get_source_files(), PTH]  # into the sdist, so wheels built from it have it too


class EditableWheelWithPth(editable_wheel):
    """``editable_wheel`` that also writes the start-up ``.pth`` file into the unpacked wheel."""

    def _run_build_commands(
        self, dist_name: str, unpacked_wheel: str, build_lib: str, tmp_dir: str
    ) -> tuple[list[str], dict[str, str]]:
        outputs = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(HERE / PTH, Path(unpacked_wheel, PTH))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
