"""Owns decoding many whole zstd frames, back to back, in one call into libzstd that runs without Python's lock."""

from __future__ import annotations

import ctypes
import functools
import threading

# The library's soname, not ctypes.util.find_library, which runs `ldconfig -p` in a subprocess. Debian's libzstd1
# (which dpkg itself needs) has it; python-zstandard carries its own copy, which it does not export.
LIBRARY = "libzstd.so.1"

_local = threading.local()


class FrameError(Exception):
    """The frames do not decode to what they must: damaged, a checksum that fails, or another size in all."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError:
        return None
    lib.ZSTD_createDCtx.restype = ctypes.c_void_p
    lib.ZSTD_createDCtx.argtypes = []
    lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
    lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
    lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
    lib.ZSTD_decompressDCtx.argtypes = [
        ctypes.c_void_p,  # the context
        ctypes.c_void_p,  # into
        ctypes.c_size_t,
        ctypes.c_char_p,  # from
        ctypes.c_size_t,
    ]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    lib.ZSTD_getErrorName.restype = ctypes.c_char_p
    lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
    return lib


def available() -> bool:
    """Whether libzstd can be loaded here; without it, a caller decodes frame by frame."""
    return _library() is not None


class _Context:
    """A decompression context of this thread's, freed with it: making one costs more than decoding a page."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.dctx = lib.ZSTD_createDCtx()
        if not self.dctx:
            raise MemoryError("libzstd could not make a decompression context")

    def __del__(self) -> None:
        self.lib.ZSTD_freeDCtx(self.dctx)


def decode(frames: bytes, size: int) -> bytearray:
    """The plain bytes of `frames`, whole zstd frames back to back, which must come to exactly `size` bytes.

    One call decodes them all, holding no Python lock: python-zstandard's own batch call gives a Python object per
    frame, and joining those took a quarter of its time for 4 KiB pages. libzstd checks each frame's checksum and
    the size its header gives; FrameError if one fails or the frames hold more or less than `size`."""
    lib = _library()
    if lib is None:
        raise FrameError(f"{LIBRARY} cannot be loaded")
    context = getattr(_local, "context", None)
    if context is None:
        context = _local.context = _Context(lib)
    plain = bytearray(size)
    into = (ctypes.c_char * size).from_buffer(plain)
    got = lib.ZSTD_decompressDCtx(context.dctx, into, size, frames, len(frames))
    del into  # the export of `plain`'s buffer ends here, so that it may be resized or freed later
    if lib.ZSTD_isError(got):
        raise FrameError(lib.ZSTD_getErrorName(got).decode(errors="replace"))
    if got != size:
        raise FrameError(f"they hold {got} bytes, not {size}")
    return plain
