"""Test setup for the CUDA plugin: import `engine_cuda` from the checkout, and run Triton
kernels in the interpreter (on CPU tensors) when no GPU is present.

Rule: TRITON_INTERPRET must be set before anything imports triton, so it is set here.
"""

from __future__ import annotations

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
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the tests skip
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


def _fix_interpreter_bf16_dot() -> None:
    """Triton 3.6's interpreter keeps bfloat16 as raw uint16 bits and multiplies those bits
    in `tl.dot`. Widen bfloat16 operands to float32 first (exact), as the GPU's MMA does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.view(np.uint16).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

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


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index()
    _fix_interpreter_bf16_dot()
