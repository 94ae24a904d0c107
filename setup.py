"""Builds the optional extension fastsplit._C from csrc/ (see csrc/README.md).

* The C++ sources (the CPU build of the kernels and the pybind11 bindings) always build.
* With nvcc found (PATH or $CUDA_HOME/bin), the .cu kernels are compiled for the architectures in
  $FASTSPLIT_CUDA_ARCHS (default "80;90a;100", 100 where nvcc has it, plus PTX for the newest non-"a" one) and linked against the
  static CUDA runtime: no torch C++ ABI, so one build serves every torch version.
* FASTSPLIT_NO_CUDA=1 skips nvcc. A failed nvcc step falls back to the CPU build, and a failed C++ build
  leaves the package installable without the extension (torch and Triton paths still work).
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
CU_SOURCES = [os.path.join(CSRC, "cuda", "split_epilogue.cu")]


def _nvcc():
    if os.environ.get("FASTSPLIT_NO_CUDA") == "1":
        return None
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def _default_archs(nvcc):
    """A100, H100/H200 (sm_90a) and, where this nvcc has it (CUDA 12.8+), B200 (sm_100)."""
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    return "80;90a;100" if "compute_100" in listed else "80;90a"


def _gencode(archs):
    flags, plain = [], []
    for a in archs:
        num = a.replace("sm_", "").replace("compute_", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if not num.endswith("a"):
            plain.append(num)
        elif num[:-1] not in plain:
            plain.append(num[:-1])
    if plain:  # PTX of the newest portable arch, for GPUs newer than the list
        top = max(plain, key=lambda s: int(s))
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def _cuda_home(nvcc):
    """The toolkit folder holding libcudart_static.a: $CUDA_HOME, nvcc's parent, or /usr/local/cuda."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in filter(None, cands):
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if os.path.exists(os.path.join(home, lib, "libcudart_static.a")):
                return home, os.path.join(home, lib)
    raise OSError("libcudart_static.a not found (set CUDA_HOME)")


class BuildExt(build_ext):
    def build_extension(self, ext):
        nvcc = _nvcc()
        if not nvcc:
            print("fastsplit: nvcc not found (or FASTSPLIT_NO_CUDA=1); building the CPU kernels only", file=sys.stderr)
            return super().build_extension(ext)
        archs = [a for a in os.environ.get("FASTSPLIT_CUDA_ARCHS", _default_archs(nvcc)).replace(",", ";").split(";")
                 if a]
        plain = (list(ext.extra_objects), list(ext.define_macros), list(ext.include_dirs), list(ext.library_dirs),
                 list(ext.libraries))
        try:
            home, libdir = _cuda_home(nvcc)
            ext.extra_objects += self._compile_cuda(nvcc, archs)
            ext.define_macros += [("FASTSPLIT_WITH_CUDA", "1"), ("FASTSPLIT_CUDA_ARCHS", f'"{";".join(archs)}"')]
            ext.include_dirs.append(os.path.join(home, "include"))
            ext.library_dirs.append(libdir)
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            return super().build_extension(ext)
        except Exception as exc:  # nvcc or the CUDA link failed: the CPU build still serves
            print(f"fastsplit: the CUDA build failed ({exc}); building the CPU kernels only", file=sys.stderr)
        (ext.extra_objects, ext.define_macros, ext.include_dirs, ext.library_dirs, ext.libraries) = plain
        return super().build_extension(ext)

    def _compile_cuda(self, nvcc, archs):
        out = os.path.join(self.build_temp, "cuda")
        os.makedirs(out, exist_ok=True)
        objects = []
        for src in CU_SOURCES:
            obj = os.path.join(out, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", os.path.join(HERE, src), "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
                   "-Xcompiler", "-fPIC", "-I", os.path.join(HERE, CSRC, "include"), *_gencode(archs)]
            print(" ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            objects.append(obj)
        return objects


def _extension():
    try:
        import pybind11
    except ImportError:  # a build without pybind11 installs the pure-Python package
        return []
    return [Extension(
        "fastsplit._C",
        sources=[os.path.join(CSRC, "bindings.cpp"), os.path.join(CSRC, "cpu", "split_epilogue.cpp")],
        include_dirs=[pybind11.get_include(), os.path.join(CSRC, "include")],
        extra_compile_args=["-O3", "-std=c++17"],
        language="c++",
        optional=True,
    )]


setup(ext_modules=_extension(), cmdclass={"build_ext": BuildExt})
