"""engine-tpu: the Google TPU platform plugin over torch_xla (entry point `tpu`)."""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms() -> list[type]:
    from engine_tpu.platform import TpuPlatform

    return [TpuPlatform]
