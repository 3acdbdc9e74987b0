"""commlib: MPI datatype interposer, GPU-aware packing and fault-tolerant collectives.

`commlib lib` prints the preload library; `commlib.native` reaches the same C code
from Python through cffi.
"""
__version__ = "0.1.0"
