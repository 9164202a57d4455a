"""Build t2t_fast and its native extension ``t2t_fast._C``.

The extension is a pybind11 module that never includes torch headers: tensors cross as raw pointers,
sizes, strides, dtype codes and a CUDA stream, all as integers. That keeps ``pip install .`` working
under build isolation (no multi-GB torch download into the build env) and lets one binary load beside
any torch version.

CPU code is always built; its vectorised kernels (csrc/cpu_kernels.inc) three times, for AVX-512, AVX2 and the
baseline ISA, chosen at run time (t2t_fast.backend.cpu_isa). CUDA code (``csrc/*.cu``) is built when nvcc is found:
  T2T_FAST_CUDA=0  never build CUDA code
  T2T_FAST_CUDA=1  build it, and fail if nvcc is missing
  unset            build it when nvcc is found
T2T_FAST_CUDA_ARCHS overrides the targets (default "80;90a", plus PTX for compute_80).

The C++ sources compile in parallel, one job per CPU (T2T_FAST_BUILD_JOBS=N sets the number).

T2T_FAST_SANITIZE=address builds the C++ sources with AddressSanitizer (-fsanitize=address, -O1 -g): for
tests of the CPU kernels and the checks in front of them, run with gcc's libasan preloaded (the Python
interpreter is not instrumented), e.g.
  bash tests/run_asan.sh (see there: libasan and libstdc++ preloaded, leak checks off)
"""
import glob
import os
import shutil
import subprocess

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def _cuda_root(nvcc):
    """Toolkit root holding libcudart_static.a. The nvcc on PATH may be a wrapper script, so ask nvcc."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.environ["CUDA_HOME"])
    try:
        out = subprocess.run([nvcc, "-v", "--version"], capture_output=True, text=True).stderr
        for line in out.splitlines():
            if line.startswith("#$ TOP="):
                candidates.append(line.split("=", 1)[1].strip())
    except OSError:
        pass
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in candidates:
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if os.path.exists(os.path.join(root, lib, "libcudart_static.a")):
                return root, os.path.join(root, lib)
    raise RuntimeError(f"nvcc found at {nvcc} but no libcudart_static.a next to it; set CUDA_HOME")


def _sanitizer():
    sanitizer = os.environ.get("T2T_FAST_SANITIZE", "").strip()
    if sanitizer not in ("", "address"):
        raise RuntimeError(f"T2T_FAST_SANITIZE must be 'address' or unset, got {sanitizer!r}")
    return sanitizer


def _cuda_mode():
    mode = os.environ.get("T2T_FAST_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise RuntimeError(f"T2T_FAST_CUDA must be 0, 1 or unset, got {mode!r}")
    return mode


class BuildExt(build_ext):
    """Compiles ``.cu`` sources with nvcc (when wanted and found) and links them into the extension."""

    def build_extensions(self):
        mode = _cuda_mode()
        nvcc = None if mode == "0" else _find_nvcc()
        if mode == "1" and nvcc is None:
            raise RuntimeError("T2T_FAST_CUDA=1 but nvcc was not found (PATH, CUDA_HOME, /usr/local/cuda*)")
        # setuptools reuses objects in build/ by timestamp alone: after a build with another CUDA setting
        # (T2T_FAST_CUDA=0 after a CUDA build, other archs) it would link the old ones. Rebuild then.
        sanitizer = _sanitizer()
        configuration = (f"cuda={nvcc is not None} archs={os.environ.get('T2T_FAST_CUDA_ARCHS', '80;90a')} "
                         f"sanitize={sanitizer}")
        marker = os.path.join(self.build_temp, "t2t_fast_build_configuration")
        previous = None
        if os.path.exists(marker):
            with open(marker) as f:
                previous = f.read()
        if previous != configuration:
            self.force = True
        for ext in self.extensions:
            if sanitizer:
                # after -O3: the last -O wins; -O1 keeps ASan's reports exact
                ext.extra_compile_args += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-O1", "-g"]
                ext.extra_link_args += [f"-fsanitize={sanitizer}"]
            cu_sources = [s for s in ext.sources if s.endswith(".cu")]
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            if nvcc is None or not cu_sources:
                if cu_sources:
                    print("t2t_fast: building the CPU extension only (T2T_FAST_CUDA=0 or nvcc not found)")
                continue
            cuda_objects = self._compile_cuda(nvcc, cu_sources, ext.depends)
            ext.extra_objects += cuda_objects
            ext.depends += cuda_objects  # a rebuilt CUDA object relinks the extension
            root, libdir = _cuda_root(nvcc)
            ext.define_macros.append(("T2T_WITH_CUDA", "1"))
            ext.include_dirs.append(os.path.join(root, "include"))
            ext.library_dirs.append(libdir)
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(marker, "w") as f:
            f.write(configuration)

    def _compile_cuda(self, nvcc, sources, headers):
        """nvcc each source whose object is missing or older than it or a header; returns the objects."""
        archs = os.environ.get("T2T_FAST_CUDA_ARCHS", "80;90a").split(";")
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", "arch=compute_80,code=compute_80"]  # PTX for GPUs newer than the list
        os.makedirs(self.build_temp, exist_ok=True)
        objects = []
        for src in sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            objects.append(obj)
            if not self.force and os.path.exists(obj) and all(
                    os.path.getmtime(obj) >= os.path.getmtime(dep) for dep in [src, *headers]):
                continue
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--threads", "2", "-Icsrc", "-DT2T_WITH_CUDA=1", *gencode]
            print("t2t_fast: " + " ".join(cmd))
            subprocess.check_call(cmd, cwd=HERE)
        return objects


native = Pybind11Extension(
    "t2t_fast._C",
    sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu")),
    include_dirs=["csrc"],
    depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.inc")),  # a header edit rebuilds the extension
    cxx_std=17,
    extra_compile_args=["-O3", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

ParallelCompile("T2T_FAST_BUILD_JOBS", default=0).install()  # 0: one job per CPU

setup(
    packages=find_packages(include=["t2t_fast", "t2t_fast.*"]) + ["t2t_fast.kernels"],
    package_dir={"t2t_fast.kernels": "kernels"},
    ext_modules=[native],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
