"""numpy arrays, cupy arrays and torch tensors (CPU or CUDA) as the engines see them:
a pointer, a byte count, a dtype name, where the memory is and which stream is current.
No copies: a buffer the operation needs in a layout it does not have is an error, not a
silent copy."""
import numpy as np

from collectives import DTYPES

_TORCH_NAMES = {"half": "float16", "float": "float32", "double": "float64", "long": "int64", "int": "int32",
                "short": "int16"}


class View:
    __slots__ = ("obj", "ptr", "nbytes", "count", "dtype", "device", "library", "shape")

    def __init__(self, obj, ptr, nbytes, count, dtype, device, library, shape):
        self.obj, self.ptr, self.nbytes, self.count = obj, ptr, nbytes, count
        self.dtype, self.device, self.library, self.shape = dtype, device, library, tuple(shape)

    def stream(self):
        """The current stream of the array's device (0: the legacy stream, or host memory)."""
        if not self.device:
            return 0
        if self.library == "torch":
            import torch
            return torch.cuda.current_stream(self.obj.device).cuda_stream
        import cupy
        return cupy.cuda.get_current_stream().ptr


def library_of(x):
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    if isinstance(x, np.ndarray):
        return "numpy"
    raise TypeError(f"expected a numpy array, a cupy array or a torch tensor, not {type(x).__name__}")


_NAMES = {}  # dtype object -> name (numpy's dtype.name is slow for a per-call lookup)


def dtype_name(x):
    dtype = x.dtype
    name = _NAMES.get(dtype)
    if name is None:
        if library_of(x) == "torch":
            name = str(dtype).replace("torch.", "")
            name = _TORCH_NAMES.get(name, name)
        else:
            name = np.dtype(dtype).name
        _NAMES[dtype] = name
    return name


def view(x, what, writeable=True):
    """The View of x; a clear error for what the engines cannot take as it is."""
    if type(x) is np.ndarray:  # the common case first
        name = _NAMES.get(x.dtype) or dtype_name(x)
        if name in DTYPES and x.flags.c_contiguous and (x.flags.writeable or not writeable) and x.dtype.isnative:
            return View(x, x.ctypes.data, x.nbytes, x.size, name, False, "numpy", x.shape)
    lib = library_of(x)
    name = dtype_name(x)
    if name not in DTYPES:
        raise TypeError(f"{what}: dtype {name} is not supported (supported: {', '.join(DTYPES)})")
    if lib == "torch":
        if not x.is_contiguous():
            raise ValueError(f"{what}: the tensor is not contiguous (call .contiguous() first)")
        device = x.device.type == "cuda"
        if x.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{what}: tensors on {x.device.type} are not supported (cpu, cuda)")
        return View(x, x.data_ptr(), x.numel() * x.element_size(), x.numel(), name, device, lib, x.shape)
    if lib != "torch" and not x.dtype.isnative:
        raise TypeError(f"{what}: the array's byte order is not the machine's ({x.dtype.str}); "
                        "convert it first (x.astype(x.dtype.newbyteorder('=')))")
    if lib == "cupy":
        if not x.flags.c_contiguous:
            raise ValueError(f"{what}: the array is not C-contiguous")
        return View(x, x.data.ptr, x.nbytes, x.size, name, True, lib, x.shape)
    if not x.flags.c_contiguous:
        raise ValueError(f"{what}: the array is not C-contiguous (np.ascontiguousarray first)")
    if writeable and not x.flags.writeable:
        raise ValueError(f"{what}: the array is read-only and the operation writes it")
    return View(x, x.ctypes.data, x.nbytes, x.size, name, False, lib, x.shape)


def empty(like, shape):
    """A new array of like's library, dtype and device."""
    lib = library_of(like)
    if lib == "torch":
        import torch
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    if lib == "cupy":
        import cupy
        with cupy.cuda.Device(like.device.id):
            return cupy.empty(tuple(shape), dtype=like.dtype)
    return np.empty(tuple(shape), dtype=like.dtype)


def rows_split(rows, parts):
    """The rows of each part when `rows` are split in `parts` as evenly as possible (the
    first rows % parts parts one longer: numpy.array_split)."""
    base, extra = divmod(rows, parts)
    return [base + (i < extra) for i in range(parts)]
