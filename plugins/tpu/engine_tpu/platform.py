"""The Google TPU platform over torch_xla: padded buckets, static-shape attention, XLA
collectives.

Rule: nothing imports torch_xla at discovery (`is_available` looks for the package and a TPU
without importing it); the device, the graph runner and the communicator import it when
built. With `ENGINE_TPU_ALLOW_CPU=1` and `PJRT_DEVICE=CPU` the same code runs on XLA's CPU
device (tests); otherwise a TPU must be present.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch

from platforms.buckets import BucketLimits, num_programs
from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    GraphRunner,
    ModelForward,
    Platform,
)
from platforms.static_attention import StaticPagedAttentionBackend

if TYPE_CHECKING:
    from platforms.config import PlatformConfig

ALLOW_CPU_ENV = "ENGINE_TPU_ALLOW_CPU"
_GOOGLE_PCI_VENDOR = "0x1ae0"
_MAX_PROGRAMS = 512


def tpu_chips(sysfs: str = "/sys/bus/pci/devices") -> list[str]:
    """PCI addresses of Google devices (TPU chips), or /dev/accel* / /dev/vfio nodes."""
    chips = []
    for dev in sorted(glob.glob(os.path.join(sysfs, "*"))):
        try:
            with open(os.path.join(dev, "vendor")) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    chips.append(os.path.basename(dev))
        except OSError:
            continue
    return chips


def xla_cpu_allowed() -> bool:
    return (os.environ.get(ALLOW_CPU_ENV, "") not in ("", "0")
            and os.environ.get("PJRT_DEVICE", "").upper() == "CPU")


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    priority = 90
    capabilities = Capabilities(
        dtypes=(torch.bfloat16, torch.float32),
        graph_capture="XLA programs per padded bucket (batch, chunk, blocks: powers of 2)",
        distributed_backend="xla",
        ray_device_resource="TPU",  # what Ray detects on a TPU host
        # torch_xla's functionalization cannot take inference tensors: logits and sampling
        # run outside the bucket runner's forward, so the whole step runs under no_grad.
        inference_mode=False,
        notes={"attention": "static-shape paged (platforms.static_attention)"},
    )

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("torch_xla") is None:
            return False
        return xla_cpu_allowed() or bool(tpu_chips())

    # ---- device & memory ----
    def device(self, local_rank: int = 0) -> torch.device:
        import torch_xla

        return torch_xla.device()

    def device_count(self) -> int:
        return max(1, len(tpu_chips()))

    def memory_info(self) -> tuple[int, int]:
        if xla_cpu_allowed():
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            return free, total
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(self.device())
        total = int(info["bytes_limit"])
        return total - int(info["bytes_used"]), total

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()

    def seed_everything(self, seed: int) -> None:
        import torch_xla.core.xla_model as xm

        torch.manual_seed(seed)
        xm.set_rng_state(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        # XLA has no torch.Generator; per-request seeded sampling draws on the host.
        gen = torch.Generator()
        gen.manual_seed(seed)
        return gen

    # ---- config ----
    def resolve_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if xla_cpu_allowed():
            return torch.float32
        return torch.bfloat16

    def validate(self, config: PlatformConfig) -> list[str]:
        problems = super().validate(config)
        limits = BucketLimits.from_config(config)
        count = num_programs(limits)
        if count > _MAX_PROGRAMS:
            problems.append(
                f"{count} shape buckets could be compiled (batch x chunk x blocks), more than "
                f"{_MAX_PROGRAMS}; lower --max-num-seqs, --max-num-batched-tokens or "
                "--max-model-len.")
        return problems

    # ---- factories ----
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return StaticPagedAttentionBackend(spec)

    def graph_runner(self, forward: ModelForward, config: PlatformConfig,
                     attention: Sequence[AttentionBackend] = ()) -> GraphRunner:
        from engine_tpu.graph import XlaBucketRunner

        return XlaBucketRunner(forward, config, attention)

    def communicator(self, group):
        from engine_tpu.communicator import XlaCommunicator

        return XlaCommunicator(group)

    def describe(self) -> dict[str, Optional[str]]:
        info = super().describe()
        info["mode"] = "XLA CPU device" if xla_cpu_allowed() else "TPU"
        return info
