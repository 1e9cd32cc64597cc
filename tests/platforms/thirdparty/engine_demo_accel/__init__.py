"""A third-party platform plugin, installed as its own distribution in the tests.

Rule: it imports only the public contract (`platforms.interface`, `platforms.kernels`,
`platforms.hookspecs`) and implements every concern its own way: a dense-gather attention
backend, a graph runner that pads batches to power-of-two buckets (as a static-shape device
would), a `silu_and_mul` override, and host memory queries. Nothing in `engine/` or
`platforms/` knows it exists.
"""

from platforms.hookspecs import hookimpl


@hookimpl
def engine_platforms():
    from engine_demo_accel.platform import DemoAccelPlatform

    return [DemoAccelPlatform]
