"""Platform discovery and selection: which plugins are loaded, and which platform runs.

Rule: every platform, the built-in CPU one included, arrives through the `engine_platforms`
hook of a plugin found in the `engine.plugins` entry-point group. Loading is ordered (by
entry-point name) and idempotent; selection is explicit (`--device` / `ENGINE_PLATFORM`) or
the single available platform with the highest priority, and it always says why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Optional

import pluggy

from platforms import hookspecs
from platforms.interface import PLATFORM_API_VERSION, Platform
from platforms.kernels import KernelImpl, KernelTable, resolve_kernels

ENTRY_POINT_GROUP = "engine.plugins"
PLUGINS_ENV = "ENGINE_PLUGINS"  # comma-separated allow-list of entry-point names
PLATFORM_ENV = "ENGINE_PLATFORM"  # forces a platform by name, like --device
BUILTIN_PLUGIN = "cpu"  # always loaded, whatever the allow-list says
_BUILTIN_MODULE = "platforms.cpu"


@dataclass(frozen=True)
class PlatformInfo:
    """What discovery learned about one platform class, before anything is built."""

    name: str
    platform_class: type[Platform]
    plugin: str  # name the plugin was registered under (its entry-point name)
    distribution: Optional[str]  # None: the built-in fallback, not installed with metadata
    available: bool
    priority: int
    api_version: int
    capabilities: dict[str, Optional[str]]
    problem: Optional[str]  # why it cannot be selected even if available; None if fine


@dataclass(frozen=True)
class Selection:
    platform: Platform
    info: PlatformInfo
    reason: str  # e.g. "forced by --device", "highest priority among available: cpu"


def make_plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager that knows the engine's hook specs and nothing else."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def parse_allow_list(value: Optional[str]) -> Optional[frozenset[str]]:
    """`ENGINE_PLUGINS` text -> set of entry-point names; None (unset or blank) allows all."""
    if value is None or not value.strip():
        return None
    return frozenset(part.strip() for part in value.split(",") if part.strip())


class PlatformRegistry:
    """Plugins loaded into one plugin manager, the platforms they provide, and the choice.

    Discovery results and platform instances are cached here, so one registry per process
    (see `get_registry`) gives every caller the same platform object.
    """

    def __init__(
        self,
        plugin_manager: Optional[pluggy.PluginManager] = None,
        allow: Optional[frozenset[str]] = None,
    ) -> None:
        self.plugin_manager = plugin_manager or make_plugin_manager()
        self.allow = allow
        # plugin name -> distribution name (None for the built-in fallback), in load order.
        self._sources: dict[str, Optional[str]] = {}
        self._infos: Optional[list[PlatformInfo]] = None
        self._instances: dict[str, Platform] = {}
        self._loaded = False

    # ---- loading ----
    def register_plugin(
        self, plugin: Any, name: str, distribution: Optional[str] = None
    ) -> bool:
        """Register `plugin` (module or object with hookimpls) once; False if already there."""
        pm = self.plugin_manager
        if pm.is_registered(plugin):
            return False
        existing = pm.get_plugin(name)
        if existing is not None:
            raise RuntimeError(
                f"Two plugins are named {name!r}: one from distribution "
                f"{self._sources.get(name) or 'built-in'}, one from {distribution or 'built-in'}. "
                f"Uninstall one, or leave one out of {PLUGINS_ENV}."
            )
        pm.register(plugin, name=name)
        self._sources[name] = distribution
        self._infos = None
        return True

    def load_entry_points(self) -> list[str]:
        """Load allowed `engine.plugins` entry points in name order; return the new ones."""
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        loaded = []
        for ep in sorted(eps, key=lambda e: (e.name, e.value)):
            dist = ep.dist.name if ep.dist is not None else None
            is_builtin = ep.value == _BUILTIN_MODULE
            if self.allow is not None and ep.name not in self.allow and not is_builtin:
                continue
            if self.plugin_manager.get_plugin(ep.name) is not None and self._sources.get(
                ep.name
            ) == dist:
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:
                raise RuntimeError(
                    f"Plugin {ep.name!r} (distribution {dist}) failed to import: {exc}. "
                    f"Fix or uninstall it, or set {PLUGINS_ENV} to the plugins you want."
                ) from exc
            if self.register_plugin(plugin, ep.name, dist):
                loaded.append(ep.name)
        return loaded

    def load_builtin(self) -> bool:
        """Register the CPU plugin if no entry point did (a checkout run without install)."""
        module: ModuleType = importlib.import_module(_BUILTIN_MODULE)
        if self.plugin_manager.is_registered(module):
            return False
        return self.register_plugin(module, BUILTIN_PLUGIN, None)

    def load(self) -> None:
        """Entry points first, then the built-in fallback. Safe to call any number of times."""
        self.load_entry_points()
        self.load_builtin()
        self._loaded = True

    # ---- discovery ----
    def discover(self) -> list[PlatformInfo]:
        """Every platform the loaded plugins provide, ordered by plugin name then class order."""
        if self._infos is not None:
            return self._infos
        if not self._loaded:
            self.load()
        hook = self.plugin_manager.hook.engine_platforms
        # Called one plugin at a time (not through the hook caller) so each class is tied to
        # the distribution it came from, and so the order is by name, not registration.
        impls = {impl.plugin_name: impl for impl in hook.get_hookimpls()}
        infos: list[PlatformInfo] = []
        seen: dict[str, PlatformInfo] = {}
        for plugin_name in sorted(impls):
            dist = self._sources.get(plugin_name)
            for cls in impls[plugin_name].function() or []:
                info = _describe(cls, plugin_name, dist)
                if info.name in seen:
                    if seen[info.name].platform_class is cls:
                        continue  # one class offered twice: loading stays idempotent
                    other = seen[info.name]
                    raise RuntimeError(
                        f"Platform name {info.name!r} is claimed by plugin {other.plugin!r} "
                        f"({other.distribution or 'built-in'}) and plugin {plugin_name!r} "
                        f"({dist or 'built-in'}); uninstall one or restrict {PLUGINS_ENV}."
                    )
                seen[info.name] = info
                infos.append(info)
        self._infos = infos
        return infos

    def kernel_impls(self) -> list[KernelImpl]:
        """Every kernel implementation the loaded plugins offer through `engine_kernels`."""
        if not self._loaded:
            self.load()
        impls: list[KernelImpl] = []
        for hookimpl in self.plugin_manager.hook.engine_kernels.get_hookimpls():
            for impl in hookimpl.function() or []:
                if not isinstance(impl, KernelImpl):
                    raise TypeError(
                        f"Plugin {hookimpl.plugin_name!r} returned {impl!r} from engine_kernels; "
                        "expected platforms.kernels.KernelImpl objects."
                    )
                impls.append(impl)
        return impls

    def kernel_table(self, platform: Platform) -> KernelTable:
        """The op table for `platform`: its own overrides and the plugins', by priority."""
        return resolve_kernels(platform.name, [*platform.kernel_overrides(), *self.kernel_impls()])

    # ---- selection ----
    def choose(self, device: Optional[str] = None) -> Selection:
        """The platform to run on, and why. `device` (from --device) beats ENGINE_PLATFORM."""
        infos = self.discover()
        env_device = os.environ.get(PLATFORM_ENV) or None
        if device is not None:
            return self._forced(infos, device, "forced by --device")
        if env_device is not None:
            return self._forced(infos, env_device, f"forced by {PLATFORM_ENV}")
        return self._by_priority(infos)

    def _forced(self, infos: list[PlatformInfo], name: str, reason: str) -> Selection:
        by_name = {i.name: i for i in infos}
        if name not in by_name:
            found = ", ".join(sorted(by_name)) or "none"
            raise ValueError(
                f"Unknown platform {name!r} ({reason}); discovered platforms: {found}. "
                f"Install its plugin, check {PLUGINS_ENV}, or pass one of those names."
            )
        info = by_name[name]
        if info.problem is not None:
            raise RuntimeError(f"Platform {name!r} ({reason}) cannot be used: {info.problem}")
        if not info.available:
            raise RuntimeError(
                f"Platform {name!r} ({reason}) is not available on this machine "
                f"(its is_available() returned False); choose another with --device or "
                f"{PLATFORM_ENV}, or run `engine plugins` to see what is available."
            )
        return Selection(self._instance(info), info, reason)

    def _by_priority(self, infos: list[PlatformInfo]) -> Selection:
        available = [i for i in infos if i.available]
        if not available:
            raise RuntimeError("No available platform was discovered; run `engine plugins`.")
        top = max(i.priority for i in available)
        best = [i for i in available if i.priority == top]
        if len(best) > 1:
            names = " and ".join(f"{i.name!r} ({i.distribution or 'built-in'})" for i in best)
            raise RuntimeError(
                f"Platforms {names} are both available with priority {top}; pick one with "
                f"--device or {PLATFORM_ENV}, or leave one out of {PLUGINS_ENV}."
            )
        info = best[0]
        if info.problem is not None:
            raise RuntimeError(
                f"Platform {info.name!r} has the highest priority but cannot be used: "
                f"{info.problem} Or force another platform with --device or {PLATFORM_ENV}."
            )
        names = ", ".join(f"{i.name} ({i.priority})" for i in available)
        return Selection(self._instance(info), info, f"highest priority among available: {names}")

    def _instance(self, info: PlatformInfo) -> Platform:
        if info.name not in self._instances:
            self._instances[info.name] = info.platform_class()
        return self._instances[info.name]


def _describe(cls: Any, plugin: str, dist: Optional[str]) -> PlatformInfo:
    """PlatformInfo for one class a plugin returned; problems are recorded, not raised."""
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise TypeError(
            f"Plugin {plugin!r} ({dist or 'built-in'}) returned {cls!r} from engine_platforms; "
            "expected Platform subclasses."
        )
    problem = None
    version = getattr(cls, "api_version", None)
    if version != PLATFORM_API_VERSION:
        problem = (
            f"it was written for platform API version {version}, this engine has version "
            f"{PLATFORM_API_VERSION}; install a {dist or plugin} release made for it."
        )
    try:
        available = bool(cls.is_available())
    except Exception as exc:  # a plugin's probe failing must not hide the other platforms
        available, problem = False, f"is_available() raised {type(exc).__name__}: {exc}"
    try:
        capabilities = cls().describe()
    except Exception as exc:
        capabilities = {"error": f"describe() raised {type(exc).__name__}: {exc}"}
    return PlatformInfo(
        name=cls.name, platform_class=cls, plugin=plugin, distribution=dist,
        available=available, priority=int(cls.priority), api_version=version,
        capabilities=capabilities, problem=problem,
    )


_registry: Optional[PlatformRegistry] = None


def get_registry() -> PlatformRegistry:
    """The process-wide registry, created (reading ENGINE_PLUGINS) on first use."""
    global _registry
    if _registry is None:
        _registry = PlatformRegistry(allow=parse_allow_list(os.environ.get(PLUGINS_ENV)))
        _registry.load()
    return _registry


def reset_registry() -> None:
    """Forget loaded plugins and cached platforms (tests, or after changing the env)."""
    global _registry
    _registry = None


def discover() -> list[PlatformInfo]:
    return get_registry().discover()


def choose_platform(device: Optional[str] = None) -> Selection:
    return get_registry().choose(device)


def kernel_table(platform: Platform) -> KernelTable:
    return get_registry().kernel_table(platform)


def select_platform(device: Optional[str] = None) -> Platform:
    """The platform instance to run on (cached per process); see `PlatformRegistry.choose`."""
    return get_registry().choose(device).platform
