"""Test setup for the CUDA plugin: import `engine_cuda` from the checkout, and run Triton
kernels in the interpreter (on CPU tensors) when no GPU is present.

Rule: TRITON_INTERPRET must be set before anything imports triton, so it is set here.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a python int with int() on a
    1-element array, which numpy >= 2.4 refuses: `range(tensor_lo, tensor_hi)` in a kernel
    then fails on CPU only. Convert through the array's single element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


def _fix_interpreter_dot() -> None:
    """Triton 3.6's interpreter keeps bfloat16 as raw uint16 bits and multiplies those bits
    in `tl.dot`, and its numpy matmul with a forced dtype skips BLAS (slow). Widen 16-bit
    floats to float32 (exact, as the GPU's MMA does) and multiply with torch."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def as_float32(handle) -> torch.Tensor:
        data = handle.data
        if handle.dtype.scalar == tl.bfloat16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (a.dtype.scalar.is_floating() and d.dtype.scalar == tl.float32):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = torch.matmul(as_float32(a), as_float32(b)).numpy()
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    original_dot = interpreter.InterpreterBuilder.create_dot
    interpreter.InterpreterBuilder.create_dot = create_dot

    # Its float32 -> bfloat16 casts truncate; the GPU (and torch) round to nearest even.
    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            bits = rounded.view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
    _fix_interpreter_index()
    _fix_interpreter_dot()
