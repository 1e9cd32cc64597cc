"""engine-rocm: the AMD ROCm platform plugin (entry point `rocm` in `engine.plugins`)."""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms() -> list[type]:
    from engine_rocm.platform import RocmPlatform

    return [RocmPlatform]
