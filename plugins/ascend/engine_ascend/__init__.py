"""engine-ascend: the Huawei Ascend platform plugin over torch_npu (entry point `ascend`)."""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms() -> list[type]:
    from engine_ascend.platform import AscendPlatform

    return [AscendPlatform]
