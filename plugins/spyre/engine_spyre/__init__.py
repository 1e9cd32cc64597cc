"""engine-spyre: the IBM Spyre platform plugin (entry point `spyre` in `engine.plugins`)."""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms() -> list[type]:
    from engine_spyre.platform import SpyrePlatform

    return [SpyrePlatform]
