"""Build step for kvcore's native copy kernels (the rest of the metadata is in pyproject.toml).

``build_kvcopy`` compiles ``csrc/*.cpp`` with the system C++ compiler into
``kvcore/_native/libkvcopy_cpu.so`` and, when ``nvcc`` is on PATH, ``csrc/*.cu`` into
``libkvcopy_cuda.so``. The libraries expose a plain C ABI (loaded with ctypes), so they do not
depend on the torch version. A failed compile only warns: kvcore then uses its numpy/torch fallback.
Set ``KVCORE_NO_NATIVE=1`` to skip, ``KVCORE_CUDA_ARCHS`` (e.g. "80;90") to choose GPU targets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, Distribution, setup
from setuptools.command.build import build

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
NATIVE = Path("kvcore") / "_native"


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("KVCORE_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    flags = []
    for a in filter(None, (x.strip() for x in archs)):
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    last = archs[-1].strip()
    return flags + ["-gencode", f"arch=compute_{last},code=compute_{last}"]


def compile_commands(out_dir: Path) -> list[tuple[str, list[str]]]:
    """(library, command) pairs for what this machine can build."""
    cxx = os.environ.get("CXX", "g++")
    cpp = sorted(str(p) for p in CSRC.glob("*.cpp"))
    cmds = [("libkvcopy_cpu.so", [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-pthread",
                                  f"-I{CSRC}", *cpp, "-o", str(out_dir / "libkvcopy_cpu.so")])]
    nvcc = shutil.which("nvcc")
    cu = sorted(str(p) for p in CSRC.glob("*.cu"))
    if nvcc and cu:
        cmds.append(("libkvcopy_cuda.so", [nvcc, "-O3", "-std=c++17", "-shared",
                                           "-Xcompiler", "-fPIC", "--cudart", "static",
                                           *cuda_arch_flags(), f"-I{CSRC}", *cu,
                                           "-o", str(out_dir / "libkvcopy_cuda.so")]))
    return cmds


class build_kvcopy(Command):
    description = "compile the native KV copy kernels (failures only warn)"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False
        self.outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self) -> None:
        if os.environ.get("KVCORE_NO_NATIVE"):
            return
        out_dir = ROOT / NATIVE if self.editable_mode else Path(self.build_lib) / NATIVE
        out_dir.mkdir(parents=True, exist_ok=True)
        for lib, cmd in compile_commands(out_dir):
            print("kvcore: building", lib, file=sys.stderr)
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"kvcore: WARNING: {lib} not built ({exc}); fallback copies will be used",
                      file=sys.stderr)
                continue
            if res.returncode != 0:
                print(f"kvcore: WARNING: {lib} failed to build; fallback copies will be used\n"
                      f"{res.stderr[-2000:]}", file=sys.stderr)
                continue
            self.outputs.append(str(out_dir / lib))

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else self.outputs

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class build_with_native(build):
    sub_commands = [("build_kvcopy", None), *build.sub_commands]


class NativeDistribution(Distribution):
    """Wheels carry the .so files: tag them for the platform, not py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


setup(distclass=NativeDistribution,
      cmdclass={"build": build_with_native, "build_kvcopy": build_kvcopy})
