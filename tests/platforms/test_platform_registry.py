"""Discovery and selection of platforms through real pluggy plugins and entry points."""

from __future__ import annotations

import importlib.metadata

import pytest

from platforms import registry
from platforms.cpu.platform import CpuPlatform
from platforms.hookspecs import hookimpl
from platforms.interface import PLATFORM_API_VERSION
from platforms.registry import PlatformRegistry, parse_allow_list


class PlatformsPlugin:
    """A real plugin object: pluggy calls its hookimpl like any installed plugin's."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def engine_platforms(self) -> list[type]:
        return list(self.classes)


class FastA(CpuPlatform):
    name = "fast_a"
    priority = 10


class FastB(CpuPlatform):
    name = "fast_b"
    priority = 10


class Absent(CpuPlatform):
    name = "absent"
    priority = 50

    @classmethod
    def is_available(cls) -> bool:
        return False


class FromTheFuture(CpuPlatform):
    name = "future"
    priority = 20
    api_version = PLATFORM_API_VERSION + 1


def registry_with(*classes: type, allow=None) -> PlatformRegistry:
    reg = PlatformRegistry(allow=allow)
    reg.register_plugin(PlatformsPlugin(*classes), "test-plugin", "test-dist")
    return reg


def test_cpu_is_declared_as_an_entry_point_of_the_installed_engine():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="engine.plugins")}
    assert eps["cpu"].value == "platforms.cpu"
    assert eps["cpu"].dist.name == "engine"


def test_discovery_finds_cpu_through_its_entry_point():
    infos = registry.discover()
    cpu = next(i for i in infos if i.name == "cpu")
    assert cpu.platform_class is CpuPlatform
    assert cpu.distribution == "engine"  # came from the entry point, not the fallback
    assert cpu.available and cpu.problem is None
    assert cpu.capabilities["device_type"] == "cpu"


def test_builtin_fallback_then_entry_points_registers_cpu_once():
    reg = PlatformRegistry()
    assert reg.load_builtin() is True
    assert reg.load_builtin() is False
    reg.load()
    reg.load()
    names = [i.name for i in reg.discover()]
    assert names.count("cpu") == 1
    assert next(i for i in reg.discover() if i.name == "cpu").distribution is None


def test_loading_twice_registers_nothing_twice():
    reg = PlatformRegistry()
    reg.load()
    before = len(reg.plugin_manager.get_plugins())
    assert reg.load_entry_points() == []
    reg.load()
    assert len(reg.plugin_manager.get_plugins()) == before


def test_default_selection_is_cpu_and_says_why():
    selection = registry.choose_platform()
    assert isinstance(selection.platform, CpuPlatform)
    assert selection.reason == "highest priority among available: cpu (0)"
    assert registry.select_platform() is selection.platform  # cached per process
    registry.reset_registry()
    assert registry.select_platform() is not selection.platform


def test_force_by_argument_beats_env(monkeypatch):
    reg = registry_with(FastA)
    monkeypatch.setenv(registry.PLATFORM_ENV, "fast_a")
    by_env = reg.choose()
    assert by_env.info.name == "fast_a" and by_env.reason == "forced by ENGINE_PLATFORM"
    by_arg = reg.choose("cpu")
    assert by_arg.info.name == "cpu" and by_arg.reason == "forced by --device"


def test_global_select_platform_reads_env(monkeypatch):
    monkeypatch.setenv(registry.PLATFORM_ENV, "cpu")
    assert registry.choose_platform().reason == "forced by ENGINE_PLATFORM"


def test_unknown_name_lists_discovered_platforms():
    reg = registry_with(FastA)
    # Other installed plugins (engine-tpu, ...) may be listed between the two.
    with pytest.raises(ValueError, match=r"Unknown platform 'nosuch'.*cpu, (.*, )?fast_a"):
        reg.choose("nosuch")


def test_forced_unavailable_platform_is_an_error_and_skipped_otherwise():
    reg = registry_with(Absent)
    with pytest.raises(RuntimeError, match=r"'absent' \(forced by --device\) is not available"):
        reg.choose("absent")
    assert reg.choose().info.name == "cpu"


def test_highest_priority_available_wins():
    reg = registry_with(FastA, Absent)
    selection = reg.choose()
    assert selection.info.name == "fast_a"
    assert selection.reason == "highest priority among available: cpu (0), fast_a (10)"


def test_equal_top_priority_is_an_error_naming_both():
    reg = registry_with(FastA, FastB)
    with pytest.raises(RuntimeError, match=r"'fast_a' \(test-dist\) and 'fast_b' \(test-dist\)"):
        reg.choose()
    assert reg.choose("fast_b").info.name == "fast_b"  # forcing resolves the tie


def test_api_version_mismatch_is_a_clear_error():
    reg = registry_with(FromTheFuture)
    info = next(i for i in reg.discover() if i.name == "future")
    assert info.problem is not None and info.api_version == PLATFORM_API_VERSION + 1
    expected = f"API version {PLATFORM_API_VERSION + 1}, this engine has version"
    with pytest.raises(RuntimeError, match=expected):
        reg.choose("future")
    with pytest.raises(RuntimeError, match=expected):
        reg.choose()  # it would have won on priority: refusing beats silently skipping it
    assert reg.choose("cpu").info.name == "cpu"


def test_same_platform_name_from_two_plugins_is_an_error():
    class OtherCpu(CpuPlatform):
        name = "cpu"

    reg = registry_with(OtherCpu)
    with pytest.raises(RuntimeError, match="'cpu' is claimed by plugin 'cpu'"):
        reg.discover()


def test_non_platform_return_value_names_the_plugin():
    reg = registry_with(object)
    with pytest.raises(TypeError, match="'test-plugin'"):
        reg.discover()


def test_parse_allow_list():
    assert parse_allow_list(None) is None
    assert parse_allow_list("  ") is None
    assert parse_allow_list(" cuda, ,cpu") == frozenset({"cuda", "cpu"})


def test_installed_distribution_is_discovered_with_its_name(fake_distribution):
    reg = PlatformRegistry()
    loaded = reg.load_entry_points()
    assert loaded == sorted(loaded)  # ordered by entry-point name
    assert {"cpu", "fakeplug"} <= set(loaded)  # besides any plugin installed here
    infos = {i.name: i for i in reg.discover()}
    assert infos["fakeaccel"].distribution == "engine-fakeplug"
    assert infos["fakeaccel"].plugin == "fakeplug"
    assert reg.choose().info.name == "fakeaccel"


def test_allow_list_excludes_plugins_but_keeps_cpu(fake_distribution, monkeypatch):
    only_cpu = PlatformRegistry(allow=parse_allow_list("cpu"))
    assert [i.name for i in only_cpu.discover()] == ["cpu"]
    only_fake = PlatformRegistry(allow=parse_allow_list("fakeplug"))
    assert [i.name for i in only_fake.discover()] == ["cpu", "fakeaccel"]
    monkeypatch.setenv(registry.PLUGINS_ENV, "someone-else")
    assert [i.name for i in registry.discover()] == ["cpu"]
