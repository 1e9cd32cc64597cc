"""The Intel Gaudi platform over habana_frameworks: `hpu` device, HPU graphs on padded shape
buckets, static-shape paged attention, HCCL collectives.

Rule: nothing imports habana_frameworks at discovery unless it is installed (`is_available`
finds the package first, then asks it for a device); the device, events, graphs and the
communicator import it when built. Without a Gaudi this platform is never selected.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from platforms.buckets import BucketLimits, num_programs
from platforms.communicator import TorchDistributedCommunicator
from platforms.device_module import DeviceModulePlatform
from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    Communicator,
    GraphRunner,
    ModelForward,
)
from platforms.static_attention import StaticPagedAttentionBackend

if TYPE_CHECKING:
    from platforms.config import PlatformConfig

# Gaudi's matrix engines work on 128-wide tiles: prefill chunks pad to at least 128 tokens.
MIN_QUERY_BUCKET = 128
MAX_GRAPHS = 512  # each HPU graph holds its own device memory


def _hpu():
    import habana_frameworks.torch as ht

    return ht.hpu


def hpu_available() -> bool:
    if importlib.util.find_spec("habana_frameworks") is None:
        return False
    try:
        return bool(_hpu().is_available())
    except (ImportError, RuntimeError):  # a broken install counts as absent
        return False


class HcclCommunicator(TorchDistributedCommunicator):
    """torch.distributed over Habana's HCCL backend (registered by importing its module)."""

    def __init__(self, group) -> None:
        import habana_frameworks.torch.distributed.hccl  # noqa: F401  (registers "hccl")

        super().__init__(group)


class GaudiPlatform(DeviceModulePlatform):
    name = "gaudi"
    device_type = "hpu"
    priority = 80
    capabilities = Capabilities(
        dtypes=(torch.bfloat16, torch.float32),
        graph_capture=(f"HPU graphs per padded bucket (batch, chunk >= {MIN_QUERY_BUCKET}, "
                       "blocks: powers of 2)"),
        distributed_backend="hccl",
        ray_device_resource="HPU",  # what Ray detects on a Gaudi host
        notes={"attention": "static-shape paged (platforms.static_attention)"},
    )

    @classmethod
    def is_available(cls) -> bool:
        return hpu_available()

    # ---- device & memory: DeviceModulePlatform over habana_frameworks' hpu ----
    def device_module(self):
        return _hpu()

    def memory_info(self) -> tuple[int, int]:
        hpu = _hpu()
        if hasattr(hpu, "mem_get_info"):
            return super().memory_info()
        stats = hpu.memory_stats()
        return int(stats["Limit"]) - int(stats["InUse"]), int(stats["Limit"])

    def make_generator(self, seed: int) -> torch.Generator:
        # Per-request seeded sampling draws on the host (no HPU torch.Generator is assumed).
        gen = torch.Generator()
        gen.manual_seed(seed)
        return gen

    # ---- config ----
    def resolve_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def bucket_limits(self, config: PlatformConfig) -> BucketLimits:
        return BucketLimits.from_config(config, min_query=MIN_QUERY_BUCKET)

    def validate(self, config: PlatformConfig) -> list[str]:
        problems = super().validate(config)
        count = num_programs(self.bucket_limits(config))
        if count > MAX_GRAPHS:
            problems.append(
                f"{count} shape buckets could be captured as HPU graphs (batch x chunk x "
                f"blocks), more than {MAX_GRAPHS}; lower --max-num-seqs, "
                "--max-num-batched-tokens or --max-model-len.")
        return problems

    # ---- factories ----
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return StaticPagedAttentionBackend(spec)

    def graph_factory(self, config: PlatformConfig):
        """HPU graphs, or eager replay on the same buffers with --enforce-eager."""
        from engine_gaudi.graph import EagerReplay, HpuGraph

        return EagerReplay if config.enforce_eager else HpuGraph

    def graph_runner(self, forward: ModelForward, config: PlatformConfig,
                     attention: Sequence[AttentionBackend] = ()) -> GraphRunner:
        from engine_gaudi.graph import HpuGraphBucketRunner

        return HpuGraphBucketRunner(forward, config, attention,
                                    limits=self.bucket_limits(config),
                                    make_graph=self.graph_factory(config))

    def communicator(self, group) -> Communicator:
        return HcclCommunicator(group)
