"""Builds the one native source tree (native/) into commlib/libcommlib.so with the MPI
compiler wrapper, and the C examples into commlib/_bin/.

COMMLIB_MPICC=/path/to/mpicc selects another MPI (for example Debian's Open MPI);
otherwise the mpicc of the mpich wheel (beside the interpreter or on PATH) is used.
The build writes commlib/_build_info.py recording what it targeted.
"""
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

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


def tls_flags(cc):
    """x86-64: thread-local variables through TLS descriptors (-mtls-dialect=gnu2).  The
    library is preloaded or dlopen'ed, so its TLS is the dynamic model; with descriptors an
    access costs a few instructions instead of a __tls_get_addr call (two per MPI_Pack: the
    statistics counter and the type cache's recent slots; ~16 of ~200 instructions of a 1 KiB
    pack, no time difference measurable on the dev VM), and a library loaded late still
    works.  Only where the compiler and linker accept it."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("static __thread int x; int get(void) { return ++x; }\n")
        probe = [cc, "-O2", "-fPIC", "-shared", "-mtls-dialect=gnu2", "-o", os.path.join(tmp, "t.so"), src]
        ok = subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    return ["-mtls-dialect=gnu2"] if ok else []


def native_sources():
    skip = (os.path.join("native", "bench"), ELASTIC_DIR)
    return sorted(p for p in glob.glob(os.path.join("native", "**", "*.c"), recursive=True) if not p.startswith(skip))


# The elastic engine (TCP all-reduce, membership) has no MPI in it: its own library,
# built with the plain C compiler, so training scripts need no MPI at all.
ELASTIC_DIR = os.path.join("native", "elastic")


def build_elastic(package_dir, warn, run):
    """commlib/libcommlib_elastic.so from native/elastic/*.c and the engine's reductions (CC,
    default cc; no MPI)."""
    out = os.path.join(package_dir, "libcommlib_elastic.so")
    sources = sorted(glob.glob(os.path.join(ELASTIC_DIR, "*.c"))) + [os.path.join("native", "engine", "reduce.c")]
    run([os.environ.get("CC", "cc"), "-O3", "-std=gnu11", "-fPIC", "-shared", "-fvisibility=hidden", "-pthread",
         *warn, "-o", out, *sources])
    return out


# Device pack kernels: machine code for sm_80 and sm_90, and compute_80 PTX that newer
# GPUs compile when the module loads.  The fatbin is embedded in libcommlib.so as bytes.
DEVICE_KERNELS_SOURCE = os.path.join("native", "pack", "device_kernels.cu")
NVCC_FLAGS = ["-fatbin", "-O3", "-std=c++17", "-Xfatbin=-compress-all",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_80,code=compute_80"]


def find_nvcc():
    """(nvcc path, None) or (None, why not): COMMLIB_NVCC (0 disables), PATH, /usr/local/cuda."""
    given = os.environ.get("COMMLIB_NVCC")
    if given == "0":
        return None, "COMMLIB_NVCC=0"
    if given:
        return given, None
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate, None
    return None, "no nvcc on PATH or in /usr/local/cuda/bin (set COMMLIB_NVCC=/path/to/nvcc)"


def device_kernels_image(build_temp):
    """(fatbin bytes, note): the compiled kernels, or (b"", why there are none).

    COMMLIB_DEVICE_FATBIN=file embeds a fatbin built elsewhere (for a machine without
    nvcc).  The nvcc output is kept in build_temp and reused while the source and flags
    are unchanged."""
    prebuilt = os.environ.get("COMMLIB_DEVICE_FATBIN")
    if prebuilt:
        try:
            with open(prebuilt, "rb") as f:
                return f.read(), f"prebuilt {prebuilt}"
        except OSError as e:
            return b"", f"COMMLIB_DEVICE_FATBIN: {e}"
    nvcc, why = find_nvcc()
    if not nvcc:
        return b"", why
    with open(os.path.join(ROOT, DEVICE_KERNELS_SOURCE), "rb") as f:
        key = hashlib.sha256(b"\0".join([f.read(), nvcc.encode(), " ".join(NVCC_FLAGS).encode()])).hexdigest()[:16]
    out = os.path.join(build_temp, f"device_kernels-{key}.fatbin")
    if not os.path.exists(out):
        cmd = [nvcc, *NVCC_FLAGS, "-o", out + ".tmp", DEVICE_KERNELS_SOURCE]
        print(" ".join(cmd))
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return b"", f"{nvcc} failed: {e}"
        if proc.returncode != 0:
            return b"", f"{nvcc} failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-2000:]}"
        os.replace(out + ".tmp", out)
    with open(out, "rb") as f:
        return f.read(), f"{nvcc} ({' '.join(NVCC_FLAGS)})"


def write_device_image_source(path, image):
    """A C file defining commlib_device_image / commlib_device_image_size (0: no kernels)
    and, always, commlib_device_kernels_source: the kernels' text, which NVRTC compiles
    at run time when there is no fatbin or it does not load (native/pack/nvrtc.c)."""
    with open(os.path.join(ROOT, DEVICE_KERNELS_SOURCE), "rb") as f:
        source = f.read()
    with open(path, "w") as f:
        f.write("/* Generated by setup.py: the device pack kernels (native/pack/device_kernels.cu)\n"
                " * as an nvcc fatbin and as source text, loaded by native/pack/device_pack.c. */\n"
                "#include <stddef.h>\n\n")
        f.write(f"__attribute__((aligned(64))) const unsigned char commlib_device_image[{max(len(image), 1)}] = {{")
        for i in range(0, len(image), 24):
            f.write("\n    " + ",".join(str(b) for b in image[i:i + 24]) + ",")
        f.write("\n};\n" if image else "0};\n")
        f.write(f"const size_t commlib_device_image_size = {len(image)};\n\n")
        # as bytes, not a string literal: C11 compilers need only accept 4095-character literals
        f.write(f"const char commlib_device_kernels_source[{len(source) + 1}] = {{")
        for i in range(0, len(source), 24):
            f.write("\n    " + ",".join(str(b) for b in source[i:i + 24]) + ",")
        f.write("\n    0};\n")
        f.write(f"const size_t commlib_device_kernels_source_size = {len(source)};\n")


def site_dirs():
    """This Python's site-packages folders, where the nvidia-cuda-nvrtc wheels put libnvrtc
    (the library cannot ask Python at run time: it also runs in plain C programs)."""
    import site
    dirs = [*getattr(site, "getsitepackages", lambda: [])(), site.getusersitepackages()]
    return [d for d in dict.fromkeys(dirs) if d and ":" not in d and '"' not in d and "\\" not in d]


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
        os.makedirs(self.build_temp, exist_ok=True)
        image, image_note = device_kernels_image(os.path.abspath(self.build_temp))
        print(f"commlib: device pack kernels {'embedded, from' if image else 'NOT built:'} {image_note}")
        image_source = os.path.join(os.path.abspath(self.build_temp), "device_image.c")
        write_device_image_source(image_source, image)
        command = [mpicc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-fvisibility=hidden", *tls_flags(mpicc), *warn,
                   f'-DCOMMLIB_VERSION="{VERSION}"', f'-DCOMMLIB_SITE_DIRS="{":".join(site_dirs())}"',
                   "-Inative/include", "-o", lib, *native_sources(), image_source,
                   "-Wl,-rpath,$ORIGIN/../../..", f"-Wl,-rpath,{prefix_lib}", "-ldl", "-lpthread"]
        try:  # link-time optimisation inlines the cache lookup and pack loop into MPI_Pack
            self._run([*command, "-flto"])
        except subprocess.CalledProcessError:
            print("commlib: building without -flto")
            self._run(command)
        self.outputs = [lib, build_elastic(package_dir, warn, self._run)]
        for src in sorted(glob.glob(os.path.join("examples", "*.c"))):
            exe = os.path.join(package_dir, "_bin", os.path.splitext(os.path.basename(src))[0])
            self._run([mpicc, "-O2", "-std=gnu11", *warn, "-o", exe, src, "-lm",
                       "-Wl,-rpath,$ORIGIN/../../../..", f"-Wl,-rpath,{prefix_lib}"])
            self.outputs.append(exe)
        # `commlib measure`'s timing program (and `commlib info`'s probe of the model in effect)
        tool = os.path.join(package_dir, "_bin", "measure_methods")
        self._run([mpicc, "-O2", "-std=gnu11", *warn, "-o", tool, os.path.join("native", "bench", "measure_methods.c"),
                   "-ldl", "-Wl,-rpath,$ORIGIN/../../../..", f"-Wl,-rpath,{prefix_lib}"])
        self.outputs.append(tool)
        src_dir = os.path.join(package_dir, "_src")
        os.makedirs(src_dir, exist_ok=True)
        # `commlib bench diloco` runs the training example itself
        for src in [*glob.glob(os.path.join("native", "bench", "*.c")), os.path.join("examples", "diloco_train.py")]:
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
            f.write(f"DEVICE_KERNELS = {bool(image)!r}\n")  # the device pack kernels are embedded
            f.write(f"DEVICE_KERNELS_NOTE = {image_note!r}\n")
            # the source is always embedded: NVRTC compiles it at run time without a fatbin
            f.write("DEVICE_KERNELS_SOURCE = True\n")
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
    package_data={"commlib": ["libcommlib.so", "libcommlib_elastic.so", "_bin/*", "_src/*.c", "_src/*.py"]},
)
