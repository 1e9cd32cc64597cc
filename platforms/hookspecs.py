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
