"""Native CPU kernels, compiled on first use with the system C compiler and loaded by ctypes.

Rule: optional and honest. A kernel is used only if it compiled here; otherwise the torch
implementation runs and `native_kernels_status()` says why. Builds are cached per source,
flags and CPU (they use -march=native), so only the first start pays the ~1 s compile.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

# One shared library from every source: decode attention and the named-op row kernels.
_SOURCES = (
    Path(__file__).parent / "csrc" / "paged_decode.c",
    Path(__file__).parent / "csrc" / "elementwise.c",
)
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_status = "not built yet"


def _cache_dir() -> Path:
    root = os.environ.get("ENGINE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "engine"
    )
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


@functools.cache
def load_library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (with the reason in native_kernels_status())."""
    global _status
    if os.environ.get("ENGINE_CPU_NATIVE", "1") == "0":
        _status = "disabled by ENGINE_CPU_NATIVE=0"
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        _status = "no C compiler found (set CC)"
        return None
    source = b"".join(path.read_bytes() for path in _SOURCES)
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                _status = f"compile failed: {result.stderr.strip()[:300]}"
                return None
            os.replace(built, target)  # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(str(target))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    # (..., block_size, scale, window (0: none), soft_cap (0: none), num_threads)
    lib.paged_decode_f32.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64,
                                     i64, f32, i64, f32, ctypes.c_int]
    lib.paged_decode_f32.restype = ctypes.c_int
    _declare_row_kernels(lib)
    _status = f"loaded {target}"
    return lib


def _declare_row_kernels(lib: ctypes.CDLL) -> None:
    """Argument types of elementwise.c (see its comments for the meaning of each)."""
    i64, f32, ptr, c_int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.rms_norm_f32.argtypes = [ptr, i64, i64, i64, i64, ptr, f32, i64, ptr, c_int]
    lib.rms_norm_f32.restype = None
    lib.fused_add_rms_norm_f32.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, f32, ptr, ptr,
                                           c_int]
    lib.fused_add_rms_norm_f32.restype = None
    lib.rotary_neox_f32.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64,
                                    i64, c_int]
    lib.rotary_neox_f32.restype = c_int
    lib.silu_and_mul_f32.argtypes = [ptr, i64, i64, i64, ptr, c_int]
    lib.silu_and_mul_f32.restype = None


def native_kernels_status() -> str:
    return _status
