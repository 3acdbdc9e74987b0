"""Builds the one native source tree (native/) into commlib/libcommlib.so with the MPI
compiler wrapper, and the C examples into commlib/_bin/.

COMMLIB_MPICC=/path/to/mpicc selects another MPI (for example Debian's Open MPI);
otherwise the mpicc of the mpich wheel (beside the interpreter or on PATH) is used.
The build writes commlib/_build_info.py recording what it targeted.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def find_mpicc():
    if os.environ.get("COMMLIB_MPICC"):
        return os.environ["COMMLIB_MPICC"]
    # Prefer the target environment's own MPI (its libraries are the ones used at run
    # time) over the copy pip put in an isolated build environment.
    for candidate in (os.path.join(os.path.dirname(sys.executable), "mpicc"), shutil.which("mpicc")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise SystemExit("commlib: no mpicc found: `pip install mpich`, or set COMMLIB_MPICC=/path/to/mpicc")


def native_sources():
    skip = os.path.join("native", "bench")
    return sorted(p for p in glob.glob(os.path.join("native", "**", "*.c"), recursive=True) if not p.startswith(skip))


class BuildNative(build_ext):
    """Compiles with mpicc instead of the Python extension machinery: the result is a
    plain shared library for LD_PRELOAD, loaded by cffi (ABI mode) from Python."""

    def run(self):
        mpicc = find_mpicc()
        package_dir = os.path.dirname(self.get_ext_fullpath("commlib._placeholder"))
        os.makedirs(os.path.join(package_dir, "_bin"), exist_ok=True)
        strict = ["-Werror"] if os.environ.get("CI") or os.environ.get("COMMLIB_WERROR") else []
        warn = ["-Wall", "-Wextra", *strict]
        # $ORIGIN-relative first: a wheel install puts libmpi (mpich wheel) in <prefix>/lib.
        prefix_lib = os.path.join(sys.prefix, "lib")
        lib = os.path.join(package_dir, "libcommlib.so")
        command = [mpicc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-fvisibility=hidden", *warn,
                   f'-DCOMMLIB_VERSION="{VERSION}"', "-Inative/include", "-o", lib, *native_sources(),
                   "-Wl,-rpath,$ORIGIN/../../..", f"-Wl,-rpath,{prefix_lib}", "-ldl", "-lpthread"]
        try:  # link-time optimisation inlines the cache lookup and pack loop into MPI_Pack
            self._run([*command, "-flto"])
        except subprocess.CalledProcessError:
            print("commlib: building without -flto")
            self._run(command)
        self.outputs = [lib]
        for src in sorted(glob.glob(os.path.join("examples", "*.c"))):
            exe = os.path.join(package_dir, "_bin", os.path.splitext(os.path.basename(src))[0])
            self._run([mpicc, "-O2", "-std=gnu11", *warn, "-o", exe, src, "-lm",
                       "-Wl,-rpath,$ORIGIN/../../../..", f"-Wl,-rpath,{prefix_lib}"])
            self.outputs.append(exe)
        src_dir = os.path.join(package_dir, "_src")
        os.makedirs(src_dir, exist_ok=True)
        for src in glob.glob(os.path.join("native", "bench", "*.c")):
            shutil.copy(src, src_dir)
            self.outputs.append(os.path.join(src_dir, os.path.basename(src)))
        info = os.path.join(package_dir, "_build_info.py")
        given = os.environ.get("COMMLIB_MPICC")
        with open(info, "w") as f:
            f.write("# Written by setup.py: what this build targets.\n")
            f.write(f"VERSION = {VERSION!r}\n")
            # Only a chosen MPI is pinned; the default follows the environment's mpich.
            f.write(f"MPICC = {given!r}\n")
            mpiexec = os.path.join(os.path.dirname(given), "mpiexec") if given else None
            f.write(f"MPIEXEC = {mpiexec!r}\n")
        self.outputs.append(info)

    def _run(self, cmd):
        print(" ".join(cmd))
        subprocess.check_call(cmd, cwd=ROOT)

    def get_outputs(self):
        return getattr(self, "outputs", [])


setup(
    version=VERSION,
    ext_modules=[Extension("commlib._placeholder", sources=[])],
    cmdclass={"build_ext": BuildNative},
    package_data={"commlib": ["libcommlib.so", "_bin/*", "_src/*.c"]},
)
