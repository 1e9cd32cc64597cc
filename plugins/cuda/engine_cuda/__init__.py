"""engine-cuda: the NVIDIA CUDA platform plugin (Triton attention and kernels, CUDA graphs,
NCCL), found through the `engine.plugins` entry point `cuda = engine_cuda`.

Rule: importing this package imports nothing heavy (no triton, no CUDA initialisation); the
platform class is imported when the hook is called, and its parts when first used.
"""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms() -> list[type]:
    from engine_cuda.platform import CudaPlatform

    return [CudaPlatform]
