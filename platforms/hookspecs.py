"""Hook specifications a plugin implements (pluggy), grouped by concern.

Rule: a plugin is any module or object with `@hookimpl` functions, found through the
`engine.plugins` entry-point group. Built-in pieces (the CPU platform) use the same hooks.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "engine"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def engine_platforms() -> list[type]:
    """Return the `Platform` subclasses this plugin provides.

    Called once at discovery; return classes, not instances, and import nothing heavy at
    module level: `is_available()` is asked before anything is built.

    Example::

        @hookimpl
        def engine_platforms():
            from my_plugin.platform import MyPlatform
            return [MyPlatform]
    """


@hookspec
def engine_kernels() -> list:
    """Return `platforms.kernels.KernelImpl` objects: named op implementations to offer.

    For kernel libraries that serve platforms they do not define (a platform's own kernels
    come from `Platform.kernel_overrides`). Each impl names the op, its priority (> 0; the
    torch reference is 0), its provider, and optionally the platforms it runs on. For each
    op, the highest priority among those usable on the chosen platform wins.

    Example::

        @hookimpl
        def engine_kernels():
            from platforms.kernels import KernelImpl
            from my_kernels import fast_rms_norm
            return [KernelImpl("rms_norm", fast_rms_norm, priority=20,
                               provider="my-kernels", platforms=frozenset({"cuda"}))]
    """
