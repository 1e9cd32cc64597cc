"""The CPU reference platform plugin (registered like any third-party one)."""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms() -> list[type]:
    from platforms.cpu.platform import CpuPlatform

    return [CpuPlatform]
