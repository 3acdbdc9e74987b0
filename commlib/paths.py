"""Where the installed pieces live: the preload library, the MPI tools it was built for."""
import os
import shutil
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def preload_library():
    """Absolute path of libcommlib.so, the LD_PRELOAD interposer."""
    path = os.path.join(PACKAGE_DIR, "libcommlib.so")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the native library was not built (reinstall with `pip install .`)")
    return path


def elastic_library():
    """Absolute path of libcommlib_elastic.so, the elastic all-reduce engine (no MPI in it)."""
    path = os.path.join(PACKAGE_DIR, "libcommlib_elastic.so")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the native library was not built (reinstall with `pip install .`)")
    return path


def _tool(name, env_var=None):
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    try:
        from commlib import _build_info
        built = getattr(_build_info, name.upper(), None)
        if built and os.path.exists(built):
            return built
    except ImportError:
        pass
    # The mpich wheel puts its tools beside the interpreter of the environment.
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(here):
        return here
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` not found: install an MPI (`pip install mpich`)")
    return found


def mpicc():
    """The MPI C compiler wrapper commlib was built with (COMMLIB_MPICC overrides)."""
    return _tool("mpicc", "COMMLIB_MPICC")


def mpiexec():
    """The launcher that goes with the MPI commlib was built for (COMMLIB_MPIEXEC overrides)."""
    return _tool("mpiexec", "COMMLIB_MPIEXEC")


def example_binary(name):
    """Path of a C example built at install time (commlib/_bin/NAME)."""
    path = os.path.join(PACKAGE_DIR, "_bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"example {name!r} was not built into {os.path.dirname(path)}")
    return path
