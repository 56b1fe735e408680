"""Builds the native extension ``moert._C`` with CMake (Ninja generator).

Environment (read here and passed to CMake; listed in the README):
  MOERT_CUDA         AUTO (default) | ON | OFF  -- the CUDA backend (driver API loaded at run time;
                     no CUDA toolkit needed): AUTO and ON build it on Linux, OFF leaves it out
  MOERT_BUILD_TYPE   CMake build type (default Release)
  MOERT_BUILD_DIR    where CMake builds (default build/<python tag>)
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tag = sysconfig.get_config_var("SOABI") or "py"
        build_dir = Path(os.environ.get("MOERT_BUILD_DIR", ROOT / "build" / tag)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("MOERT_CUDA", "AUTO").upper()
        if cuda not in ("AUTO", "ON", "OFF"):
            raise SystemExit(f"MOERT_CUDA={cuda!r} is not one of AUTO, ON, OFF")
        cfg = [
            f"-S{ext.source_dir}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MOERT_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMOERT_CUDA={cuda}",
        ]
        subprocess.run(["cmake", *cfg], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("moert._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
