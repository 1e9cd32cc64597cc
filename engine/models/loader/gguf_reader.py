"""A fast GGUF reader: metadata with one pass over the header, tensors as mmap views.

Rule: read only what startup needs. Large arrays in the metadata (the tokenizer's vocab and
merges) are skipped, not decoded, and tensor data is never copied until it is dequantized,
in bulk, with the `gguf` package's numpy kernels. A type they cannot read is a ValueError
naming it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from platforms.util import cdiv

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format of a scalar.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this stay undecoded (a `SkippedArray`): only the tokenizer needs them.
_MAX_DECODED_ARRAY = 1024


@dataclass(frozen=True)
class SkippedArray:
    """A long metadata array left undecoded; `count` elements of GGUF type `elem_type`."""

    elem_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first), e.g. [out, in] for a weight
    qtype: int  # ggml type id
    data: np.ndarray  # uint8 view of the raw bytes, [rows, bytes per row]


class GGUFFile:
    """Metadata dict (`fields`) and tensors of one .gguf file, memory-mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        buf = memoryview(self._mm)
        if bytes(buf[:4]) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}).")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or later).")
        self._buf, self._pos = buf, 24
        self.fields: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = [self._tensor_info() for _ in range(num_tensors)]
        alignment = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = cdiv(self._pos, alignment) * alignment
        self.tensors = [self._tensor(data_start, *info) for info in infos]
        del self._buf  # the memoryview pins the mmap; tensors keep their own views

    # ---- header parsing ----
    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        start, self._pos = self._pos, self._pos + length
        return bytes(self._buf[start:self._pos]).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            elem_type, count = self._unpack("<IQ")
            if count > _MAX_DECODED_ARRAY:
                self._skip_array(elem_type, count)
                return SkippedArray(elem_type, count)
            return [self._value(elem_type) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype}.")
        return self._unpack(_SCALAR_FORMATS[vtype])[0]

    def _skip_array(self, elem_type: int, count: int) -> None:
        if elem_type in _SCALAR_FORMATS:
            self._pos += struct.calcsize(_SCALAR_FORMATS[elem_type]) * count
            return
        if elem_type != _STRING:
            raise ValueError(f"{self.path}: nested GGUF arrays are not supported.")
        buf, pos, unpack = self._buf, self._pos, struct.unpack_from
        for _ in range(count):  # strings are length-prefixed: walk the lengths only
            pos += 8 + unpack("<Q", buf, pos)[0]
        self._pos = pos

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (num_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{num_dims}Q")
        qtype, offset = self._unpack("<IQ")
        return name, tuple(reversed(dims)), qtype, offset

    def _tensor(self, data_start: int, name: str, shape: tuple[int, ...], qtype: int,
                offset: int) -> GGUFTensor:
        block_elems, block_bytes = _block_layout(qtype, name)
        row_elems = shape[-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = row_elems // block_elems * block_bytes
        start = data_start + offset
        data = self._mm[start:start + rows * row_bytes].reshape(rows, row_bytes)
        return GGUFTensor(name, shape, qtype, data)

    # ---- tensors ----
    def iter_dequantized(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(GGUF name, float32 tensor in torch shape) for every tensor, one at a time."""
        for tensor in self.tensors:
            yield tensor.name, dequantize(tensor)


def _block_layout(qtype: int, name: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        raise ValueError(
            f"GGUF tensor {name!r} uses quantization type id {qtype}, which this engine "
            f"cannot read; use a GGUF with a supported type (F32, F16, BF16, Q8_0, Q4_0, "
            f"Q4_1, K-quants) or the HF safetensors checkpoint."
        ) from None


def dequantize(tensor: GGUFTensor) -> torch.Tensor:
    """Raw GGUF tensor -> float32 torch tensor of `tensor.shape`. The `gguf` package's numpy
    kernels work on whole tensors at once; measured as fast as torch ops here, with less code."""
    return torch.from_numpy(_dequantize_numpy(tensor)).reshape(tensor.shape)


def _dequantize_numpy(tensor: GGUFTensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(tensor.qtype)
    try:
        out = gguf_dequantize(np.asarray(tensor.data), qtype).astype(np.float32, copy=False)
    except NotImplementedError:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} uses quantization type {qtype.name}, which this "
            f"engine cannot dequantize; use a GGUF with another type (e.g. Q8_0, Q4_K_M) "
            f"or the HF safetensors checkpoint."
        ) from None
    # F32 comes back as a read-only view of the mmap; torch wants writable memory.
    return out if out.flags.writeable else out.copy()
