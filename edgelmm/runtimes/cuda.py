"""The few CUDA driver calls edgelmm needs, through ctypes on libcuda (the driver's own library,
present wherever an NVIDIA driver is: desktop Linux and every JetPack). No PyTorch, no cuda-python,
no CUDA toolkit: the TensorRT backend keeps its buffers and KV cache with these, and `doctor` and
the engine builder read the GPU's name and compute capability with them.

TensorRT and ONNX Runtime use the CUDA runtime, which works in each device's primary context; we
retain that same context, so pointers allocated here are valid for them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_CU_DEVICE_ATTRIBUTE_INTEGRATED = 18
_LIBRARIES = ("libcuda.so.1", "libcuda.so")


class CudaError(BackendUnavailable):
    """A CUDA driver call failed (no driver, no device, out of memory). Names the call."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str      # "8.7" (Orin), "9.0" (H100)
    total_memory: int            # bytes
    integrated: bool             # a Jetson's GPU shares the host's memory

    def as_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "compute_capability": self.compute_capability,
                "total_memory_mib": self.total_memory // (1 << 20), "integrated": self.integrated}


class CudaDriver:
    """One per process (`CudaDriver.get()`); every call checks its CUresult."""

    _instance: "CudaDriver | None" = None

    def __init__(self):
        lib = None
        for name in _LIBRARIES:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise CudaError("the NVIDIA driver library libcuda.so.1 is not on this machine (no NVIDIA driver)")
        self.lib = lib
        u64, vp = ctypes.c_uint64, ctypes.c_void_p
        sig = {
            "cuInit": [ctypes.c_uint], "cuDriverGetVersion": [ctypes.POINTER(ctypes.c_int)],
            "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
            "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
            "cuDeviceGetName": [ctypes.c_char_p, ctypes.c_int, ctypes.c_int],
            "cuDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
            "cuDeviceTotalMem_v2": [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), ctypes.c_int],
            "cuCtxSetCurrent": [vp],
            "cuMemAlloc_v2": [ctypes.POINTER(u64), ctypes.c_size_t], "cuMemFree_v2": [u64],
            "cuMemGetInfo_v2": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
            "cuMemsetD8Async": [u64, ctypes.c_ubyte, ctypes.c_size_t, vp],
            "cuMemcpyHtoDAsync_v2": [u64, vp, ctypes.c_size_t, vp],
            "cuMemcpyDtoHAsync_v2": [vp, u64, ctypes.c_size_t, vp],
            "cuMemcpyDtoDAsync_v2": [u64, u64, ctypes.c_size_t, vp],
            "cuStreamCreate": [ctypes.POINTER(vp), ctypes.c_uint], "cuStreamSynchronize": [vp],
            "cuStreamDestroy_v2": [vp], "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        for fn, argtypes in sig.items():
            f = getattr(lib, fn)
            f.argtypes, f.restype = argtypes, ctypes.c_int
        self._check("cuInit", lib.cuInit(0))
        self._contexts: dict[int, int] = {}

    @classmethod
    def get(cls) -> "CudaDriver":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _check(self, call: str, result: int) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            what = text.value.decode() if text.value else "unknown error"
            raise CudaError(f"CUDA driver call {call} failed: {what} (CUresult {result})")

    # --- devices -------------------------------------------------------------------------------
    def driver_version(self) -> str:
        v = ctypes.c_int()
        self._check("cuDriverGetVersion", self.lib.cuDriverGetVersion(ctypes.byref(v)))
        return f"{v.value // 1000}.{(v.value % 1000) // 10}"

    def device_count(self) -> int:
        n = ctypes.c_int()
        self._check("cuDeviceGetCount", self.lib.cuDeviceGetCount(ctypes.byref(n)))
        return n.value

    def _device(self, index: int) -> int:
        dev = ctypes.c_int()
        self._check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), index))
        return dev.value

    def _attribute(self, attr: int, dev: int) -> int:
        v = ctypes.c_int()
        self._check("cuDeviceGetAttribute", self.lib.cuDeviceGetAttribute(ctypes.byref(v), attr, dev))
        return v.value

    def gpu(self, index: int = 0) -> GpuInfo:
        dev = self._device(index)
        name = ctypes.create_string_buffer(256)
        self._check("cuDeviceGetName", self.lib.cuDeviceGetName(name, 256, dev))
        mem = ctypes.c_size_t()
        self._check("cuDeviceTotalMem", self.lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev))
        major = self._attribute(_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        minor = self._attribute(_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        integrated = bool(self._attribute(_CU_DEVICE_ATTRIBUTE_INTEGRATED, dev))
        return GpuInfo(index, name.value.decode(errors="replace"), f"{major}.{minor}", mem.value, integrated)

    def gpus(self) -> list[GpuInfo]:
        return [self.gpu(i) for i in range(self.device_count())]

    def use_device(self, index: int = 0) -> None:
        """Make the device's primary context current on this thread (the one TensorRT uses)."""
        if index not in self._contexts:
            ctx = ctypes.c_void_p()
            self._check("cuDevicePrimaryCtxRetain", self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx),
                                                                                        self._device(index)))
            self._contexts[index] = ctx.value
        self._check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(self._contexts[index]))

    def memory_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._check("cuMemGetInfo", self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)))
        return free.value, total.value

    # --- memory and streams ----------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(f"cuMemAlloc({nbytes} bytes)", self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(nbytes, 1)))
        return ptr.value

    def free(self, ptr: int) -> None:
        if ptr:
            self._check("cuMemFree", self.lib.cuMemFree_v2(ptr))

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check("cuStreamCreate", self.lib.cuStreamCreate(ctypes.byref(s), 0))
        return s.value or 0

    def synchronize(self, stream: int) -> None:
        self._check("cuStreamSynchronize", self.lib.cuStreamSynchronize(stream))

    def destroy_stream(self, stream: int) -> None:
        if stream:
            self._check("cuStreamDestroy", self.lib.cuStreamDestroy_v2(stream))

    def zero(self, ptr: int, nbytes: int, stream: int) -> None:
        self._check("cuMemsetD8Async", self.lib.cuMemsetD8Async(ptr, 0, nbytes, stream))

    def to_device(self, ptr: int, array: np.ndarray, stream: int) -> None:
        """Copy a C-contiguous host array to device memory. Pageable host memory makes the copy
        complete before the call returns, so `array` may be freed right after."""
        array = np.ascontiguousarray(array)
        self._check("cuMemcpyHtoDAsync", self.lib.cuMemcpyHtoDAsync_v2(ptr, array.ctypes.data, array.nbytes, stream))

    def to_host(self, array: np.ndarray, ptr: int, stream: int) -> None:
        """Copy device memory into a C-contiguous host array (valid after `synchronize`)."""
        self._check("cuMemcpyDtoHAsync", self.lib.cuMemcpyDtoHAsync_v2(array.ctypes.data, ptr, array.nbytes, stream))

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check("cuMemcpyDtoDAsync", self.lib.cuMemcpyDtoDAsync_v2(dst, src, nbytes, stream))


class DeviceBuffer:
    """Device memory that grows (never shrinks) to the largest tensor asked of it."""

    def __init__(self, cuda: CudaDriver):
        self.cuda, self.ptr, self.nbytes = cuda, 0, 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.release()
            self.ptr, self.nbytes = self.cuda.alloc(nbytes), nbytes
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0
