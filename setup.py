"""Build neuralpatch._cpu (pybind11 + the host C++ compiler, OpenMP where it links) and
neuralpatch._C (pybind11 + nvcc) when nvcc is found; neither links libtorch.

neuralpatch._cpu (the PatchMatch CPU kernel) is built whenever a C++ compiler works, with
or without nvcc. It is optional: if no compiler works, the install still succeeds with a
warning, and neuralpatch falls back to its torch implementation. Without OpenMP it is built
single-threaded.

Environment knobs:
  NEURALPATCH_NO_CPU_EXT=1       skip neuralpatch._cpu (the torch fallback is used)
  NEURALPATCH_NO_CUDA=1          skip the CUDA module entirely
  NEURALPATCH_CUDA_ARCHS="80;90a" semicolon-separated SM targets (default 80;90a)
  CUDA_HOME / CUDA_PATH          where to look for nvcc before PATH and /usr/local/cuda
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"
# CUDA 13 removed code generation for Maxwell, Pascal and Volta.
MIN_ARCH_FOR_CUDA13 = 75


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found).resolve()
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.exists() else None


def find_cuda_home(nvcc):
    """The toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper script elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc.parent.parent, "/usr/local/cuda"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    raise RuntimeError(f"found {nvcc} but no CUDA toolkit headers; set CUDA_HOME or NEURALPATCH_NO_CUDA=1")


def nvcc_version(nvcc):
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def gencode_flags(archs, version):
    flags = []
    for arch in archs:
        number = int(re.match(r"(\d+)", arch).group(1))
        if version >= (13, 0) and number < MIN_ARCH_FOR_CUDA13:
            raise RuntimeError(f"NEURALPATCH_CUDA_ARCHS: sm_{arch} is not supported by CUDA {version[0]}.{version[1]}")
        if arch.endswith("a") and version < (12, 0):
            raise RuntimeError(f"NEURALPATCH_CUDA_ARCHS: sm_{arch} needs CUDA 12 or newer")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    # PTX for the newest plain arch, so newer GPUs can JIT the kernels.
    plain = [a for a in archs if not a.endswith("a")] or [archs[-1].rstrip("a")]
    newest = max(plain, key=lambda a: int(a))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def openmp_flags(compiler_type):
    """(compile, link) flags enabling OpenMP for a distutils compiler type."""
    if compiler_type == "msvc":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


class BuildExt(build_ext):
    """neuralpatch._cpu: tried with OpenMP, then without; a failure only warns (the extension
    is optional). neuralpatch._C: the .cu sources compiled with nvcc, then linked by setuptools
    with the C++ binding."""

    def build_extension(self, ext):
        if getattr(ext, "cuda_sources", None):
            self._build_cuda(ext)
        elif getattr(ext, "try_openmp", False):
            self._build_cpu(ext)
        else:
            super().build_extension(ext)

    def _build_cpu(self, ext):
        from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError

        failures = (CCompilerError, CompileError, ExecError, LinkError, OSError)
        base_compile, base_link = list(ext.extra_compile_args), list(ext.extra_link_args)
        omp_compile, omp_link = openmp_flags(self.compiler.compiler_type)
        ext.extra_compile_args, ext.extra_link_args = base_compile + omp_compile, base_link + omp_link
        try:
            super().build_extension(ext)
            return
        except failures as exc:
            print(f"neuralpatch: building {ext.name} with OpenMP failed ({exc}); retrying without", file=sys.stderr)
        ext.extra_compile_args, ext.extra_link_args = base_compile, base_link
        try:
            super().build_extension(ext)
        except failures as exc:
            print(
                f"neuralpatch: WARNING: could not build {ext.name} ({exc}); method='patchmatch' will use the slower torch implementation",
                file=sys.stderr,
            )

    def _build_cuda(self, ext):
        nvcc = ext.nvcc
        build_tmp = Path(self.build_temp) / "nvcc"
        build_tmp.mkdir(parents=True, exist_ok=True)
        objects = []
        for source in ext.cuda_sources:
            obj = build_tmp / (Path(source).stem + ".o")
            cmd = [
                str(nvcc),
                "-c",
                source,
                "-o",
                str(obj),
                "-O3",
                "-std=c++17",
                "--expt-relaxed-constexpr",
                "-lineinfo",
                "-Xcompiler",
                "-fPIC",
                f"-I{CSRC}",
                *ext.gencode,
                *[f"-D{k}={v}" for k, v in ext.define_macros],
            ]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


def cpu_extension():
    if os.environ.get("NEURALPATCH_NO_CPU_EXT", "0") == "1":
        print("neuralpatch: NEURALPATCH_NO_CPU_EXT=1, skipping the C++ CPU module", file=sys.stderr)
        return None
    import pybind11

    msvc = sys.platform == "win32"
    ext = Extension(
        "neuralpatch._cpu",
        sources=["csrc/patchmatch_cpu.cpp"],
        include_dirs=[pybind11.get_include()],
        extra_compile_args=["/O2", "/std:c++17"] if msvc else ["-std=c++17", "-O3"],
        extra_link_args=[],
        language="c++",
        optional=True,
    )
    ext.try_openmp = True
    return ext


def cuda_extension():
    if os.environ.get("NEURALPATCH_NO_CUDA", "0") == "1":
        print("neuralpatch: NEURALPATCH_NO_CUDA=1, skipping the CUDA module", file=sys.stderr)
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        print("neuralpatch: nvcc not found, building without the CUDA module", file=sys.stderr)
        return None
    import pybind11

    version = nvcc_version(nvcc)
    archs = [a.strip() for a in os.environ.get("NEURALPATCH_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
    cuda_home = find_cuda_home(nvcc)
    # Values carry their own quotes: both compilers get argv lists, no shell.
    macros = [
        ("NEURALPATCH_CUDA_ARCHS", '"' + ";".join(archs) + '"'),
        ("NEURALPATCH_NVCC_VERSION", f'"{version[0]}.{version[1]}"'),
    ]
    ext = Extension(
        "neuralpatch._C",
        sources=["csrc/bindings.cpp"],
        include_dirs=[pybind11.get_include(), str(cuda_home / "include"), str(CSRC)],
        library_dirs=[str(cuda_home / "lib64"), str(cuda_home / "lib64" / "stubs")],
        # Static cudart: the module needs only the driver at run time, not a matching toolkit.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        define_macros=macros,
        extra_compile_args=["-std=c++17", "-O2"],
        language="c++",
    )
    ext.nvcc = nvcc
    ext.cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    ext.gencode = gencode_flags(archs, version)
    return ext


extensions = [ext for ext in (cpu_extension(), cuda_extension()) if ext is not None]
if extensions:
    setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
else:
    setup()
