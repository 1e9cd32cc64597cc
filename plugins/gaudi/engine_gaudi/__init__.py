"""engine-gaudi: the Intel Gaudi platform plugin over habana_frameworks (entry point `gaudi`)."""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms() -> list[type]:
    from engine_gaudi.platform import GaudiPlatform

    return [GaudiPlatform]
