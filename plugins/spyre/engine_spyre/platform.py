"""The IBM Spyre platform: static shapes from warm-up shapes, compiled graphs, batch by batch.

Rule: written only against the public contract. Everything shape-related comes from the
warm-up shapes (`engine_spyre.shapes`): the scheduler gets them as a `StaticBatching`
constraint, the graph runner compiles their step shapes and pads every step to one.

Tensors stay in host memory (device type "cpu"): the Spyre software stack runs the graphs
that torch.compile's `sendnn` backend hands it, it is not a torch device of its own. With
`ENGINE_SPYRE_SIMULATE=1` the same code runs without the card: the graphs are compiled with
`eager` (default) or `inductor` (`ENGINE_SPYRE_COMPILE_BACKEND`) and run on the CPU.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch

from engine_spyre import shapes as shape_rules
from engine_spyre.graph import StaticShapeGraphRunner
from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    ModelForward,
    Platform,
)
from platforms.scheduling import StaticBatching
from platforms.static_attention import StaticPagedAttentionBackend

if TYPE_CHECKING:
    from platforms.config import PlatformConfig

SIMULATE_ENV = "ENGINE_SPYRE_SIMULATE"
BACKEND_ENV = "ENGINE_SPYRE_COMPILE_BACKEND"
HARDWARE_BACKEND = "sendnn"  # registered with torch.compile by the torch_sendnn package
SIMULATED_BACKENDS = ("eager", "inductor")
_IBM_PCI_VENDOR = "0x1014"
_ACCELERATOR_CLASS = "0x12"  # PCI base class "processing accelerator"


def simulated() -> bool:
    return os.environ.get(SIMULATE_ENV, "") not in ("", "0")


def spyre_cards(sysfs: str = "/sys/bus/pci/devices") -> list[str]:
    """PCI addresses of IBM processing accelerators (the Spyre card's vendor and class)."""
    cards = []
    for dev in sorted(glob.glob(os.path.join(sysfs, "*"))):
        try:
            with open(os.path.join(dev, "vendor")) as f:
                vendor = f.read().strip()
            with open(os.path.join(dev, "class")) as f:
                pci_class = f.read().strip()
        except OSError:
            continue
        if vendor == _IBM_PCI_VENDOR and pci_class.startswith(_ACCELERATOR_CLASS):
            cards.append(os.path.basename(dev))
    return cards


def hardware_present() -> bool:
    """The Spyre software stack is installed and a card is on the PCI bus."""
    return importlib.util.find_spec("torch_sendnn") is not None and bool(spyre_cards())


class SpyrePlatform(Platform):
    name = "spyre"
    device_type = "cpu"  # host tensors; the compiled graphs run on the card
    priority = 40
    capabilities = Capabilities(
        dtypes=(torch.float16, torch.float32),
        graph_capture="torch.compile per warm-up shape (" + HARDWARE_BACKEND +
                      "; eager/inductor simulated)",
        # Ray does not detect Spyre cards: a cluster registers them (`ray start --resources`).
        ray_device_resource="spyre",
        default_kv_cache_memory=2 * 1024**3,  # the cache lives in host memory
        notes={"scheduling": "static batches in warm-up shapes",
               "attention": "static-shape paged (platforms.static_attention)"},
    )

    @classmethod
    def is_available(cls) -> bool:
        return simulated() or hardware_present()

    # ---- device & memory ----
    def device_count(self) -> int:
        return 1 if simulated() else max(1, len(spyre_cards()))

    def memory_info(self) -> tuple[int, int]:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return free, total

    # ---- config ----
    def resolve_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # The card computes in float16; the CPU stand-in in float32 (like the CPU platform,
        # so simulated runs match it token for token).
        return torch.float32 if simulated() else torch.float16

    def compile_backend(self, config: PlatformConfig) -> Optional[str]:
        """torch.compile backend for the graphs; None (eager, still padded) with
        --enforce-eager."""
        if config.enforce_eager:
            return None
        default = "eager" if simulated() else HARDWARE_BACKEND
        return os.environ.get(BACKEND_ENV) or default

    def validate(self, config: PlatformConfig) -> list[str]:
        problems = super().validate(config)
        if not simulated() and config.dtype != torch.float16:
            problems.append(f"Spyre computes in float16; pass --dtype float16 (or set "
                            f"{SIMULATE_ENV}=1 to run the CPU stand-in).")
        backend = self.compile_backend(config)
        if simulated() and backend not in (None, *SIMULATED_BACKENDS):
            problems.append(f"{BACKEND_ENV}={backend} cannot run without the card; use one of "
                            f"{', '.join(SIMULATED_BACKENDS)}.")
        try:
            warm = shape_rules.configured_shapes()
        except ValueError as exc:
            return [*problems, str(exc)]
        for s in warm:
            if s.max_seq_len > config.max_model_len:
                problems.append(f"warm-up shape {s} reaches {s.max_seq_len} tokens, more than "
                                f"max_model_len={config.max_model_len}; shrink it in "
                                f"{shape_rules.SHAPES_ENV} or raise --max-model-len.")
            if s.batch_size * s.prompt_len > config.max_num_batched_tokens:
                problems.append(f"warm-up shape {s} prefills {s.batch_size * s.prompt_len} "
                                f"tokens in one step, more than max_num_batched_tokens="
                                f"{config.max_num_batched_tokens}; raise "
                                "--max-num-batched-tokens.")
        return problems

    # ---- factories ----
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return StaticPagedAttentionBackend(spec)

    def graph_runner(self, forward: ModelForward, config: PlatformConfig,
                     attention: Sequence[AttentionBackend] = ()) -> StaticShapeGraphRunner:
        backend = self.compile_backend(config)
        if backend == HARDWARE_BACKEND:
            import torch_sendnn  # noqa: F401  (registers the backend with torch.compile)
        step_shapes = shape_rules.step_shapes(shape_rules.configured_shapes(),
                                              config.block_size)
        return StaticShapeGraphRunner(forward, config, attention, step_shapes=step_shapes,
                                      backend=backend)

    def scheduling_constraints(self, config: PlatformConfig) -> StaticBatching:
        return shape_rules.constraints(shape_rules.configured_shapes())

    def describe(self) -> dict[str, Optional[str]]:
        info = super().describe()
        try:
            warm = ", ".join(map(str, shape_rules.configured_shapes()))
        except ValueError as exc:
            warm = f"invalid ({exc})"
        info.update({
            "mode": ("simulated on CPU" if simulated()
                     else "hardware" if hardware_present() else "hardware (no card found)"),
            "warmup_shapes": warm,
        })
        return info
