"""The CUDA platform: NVIDIA GPUs through torch.cuda, Triton kernels, CUDA graphs and NCCL.

Rule: this class only answers the contract; the work lives next to it (Triton attention in
`attention.py`, kernels in `ops/`, CUDA graphs in `graph.py`, NCCL in `communicator.py`), and
everything heavy (triton) is imported when first asked for, never at discovery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional

import torch

from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    DeviceModulePlatform,
    GraphRunner,
    ModelForward,
)

if TYPE_CHECKING:
    import torch.distributed

    from engine.config import EngineConfig
    from platforms.kernels import KernelImpl

# Named op -> module of `engine_cuda.ops` holding its Triton implementation (same name).
TRITON_KERNELS: dict[str, str] = {
    "rms_norm": "engine_cuda.ops.norm",
    "fused_add_rms_norm": "engine_cuda.ops.norm",
    "rotary_embedding": "engine_cuda.ops.rotary",
    "silu_and_mul": "engine_cuda.ops.activation",
}
# Above the torch reference (0); a kernel library can still outbid it through engine_kernels.
TRITON_KERNEL_PRIORITY = 10



class CudaPlatform(DeviceModulePlatform):
    name = "cuda"
    device_type = "cuda"
    ray_device_resource = "GPU"  # Ray's name for CUDA and ROCm devices alike
    priority = 100
    supports_graph_capture = True
    supports_pinned_memory = True
    executes_asynchronously = True
    # Decode graphs are captured up to 512. On one warm H100, 1000 x 1024/128 prompts ran
    # alike with 256 and 512 (60.4% and 60.9% of the compute roofline; an earlier 55% vs 62%
    # was Triton compiling in the first run, not this setting); 512 lets more decodes ride
    # along with prefill chunks where outputs are longer.
    default_max_num_seqs = 512
    measures_peak_memory = True
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    # What the Triton attention kernel takes: a power of two in 16..256.
    supported_head_sizes = (16, 32, 64, 128, 256)
    distributed_backend = "nccl"

    @classmethod
    def is_available(cls) -> bool:
        # A ROCm build of torch also answers torch.cuda; it belongs to the ROCm platform.
        return torch.version.hip is None and torch.cuda.is_available()

    # ---- device & memory (the rest from DeviceModulePlatform over torch.cuda) ----
    def device_module(self):
        return torch.cuda

    def peak_memory_bytes(self) -> int:
        """Peak bytes torch's allocator reserved since `reset_peak_memory` (weights,
        activations, its cache), plus what the device holds outside torch right now (CUDA
        context, cuBLAS/NCCL workspaces, other processes)."""
        free, total = self.memory_info()
        outside_torch = max(0, total - free - torch.cuda.memory_reserved())
        return int(torch.cuda.max_memory_reserved()) + outside_torch

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds every CUDA device too
        torch.cuda.manual_seed_all(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device(torch.cuda.current_device()))
        gen.manual_seed(seed)
        return gen

    # ---- config ----
    def resolve_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The checkpoint's half dtype; float32 (or anything else) checkpoints run in
        bfloat16, or float16 on GPUs without bfloat16."""
        if model_dtype in (torch.bfloat16, torch.float16):
            return model_dtype
        return torch.bfloat16 if _bf16_supported() else torch.float16

    def kv_cache_bytes(self, config: EngineConfig, model_bytes: int) -> int:
        """total x gpu_memory_utilization - peak usage of the profiling step (which already
        counts the weights, so `model_bytes` is not subtracted again)."""
        if config.cache.kv_cache_memory is not None:
            return config.cache.kv_cache_memory
        _, total = self.memory_info()
        return int(total * config.cache.gpu_memory_utilization) - self.peak_memory_bytes()

    def validate(self, config: EngineConfig) -> list[str]:
        problems = super().validate(config)
        hf = config.model.hf_config
        num_heads, num_kv_heads = hf.num_attention_heads, config.model.num_kv_heads
        if num_heads % num_kv_heads:
            problems.append(
                f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads, which "
                "the Triton attention kernel needs; run the model on another platform with "
                "--device."
            )
        parallel = getattr(config, "parallel", None)
        world = getattr(parallel, "world_size", 1)
        count = self.device_count() if self.is_available() else 0
        if world > count:
            problems.append(
                f"{world} GPUs are needed (tensor_parallel_size x pipeline_parallel_size) but "
                f"{count} are visible; lower --tensor-parallel-size or set CUDA_VISIBLE_DEVICES."
            )
        if not config.enforce_eager:
            from engine_cuda.graph import graph_problems

            problems.extend(graph_problems(config))
        return problems

    # ---- factories ----
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        from engine_cuda.attention import TritonAttentionBackend

        num_sms = torch.cuda.get_device_properties(
            torch.cuda.current_device()).multi_processor_count
        return TritonAttentionBackend(spec, num_sms=num_sms)

    def graph_runner(self, forward: ModelForward, config: EngineConfig) -> GraphRunner:
        """Eager under --enforce-eager; else full CUDA graphs for decode batches and
        piecewise graphs around attention for small mixed batches (see `graph.py`)."""
        if config.enforce_eager:
            return GraphRunner(forward, config)
        from engine_cuda.graph import CudaGraphRunner

        return CudaGraphRunner(forward, config)

    def communicator(self, group: torch.distributed.ProcessGroup) -> Communicator:
        from engine_cuda.communicator import NcclCommunicator

        return NcclCommunicator(group)

    def kernel_overrides(self) -> list[KernelImpl]:
        from platforms.kernels import KernelImpl

        return [
            KernelImpl(name, getattr(importlib.import_module(module), name),
                       priority=TRITON_KERNEL_PRIORITY, provider="engine-cuda (triton)",
                       platforms=frozenset({self.name}))
            for name, module in TRITON_KERNELS.items()
        ]

    def describe(self) -> dict[str, Optional[str]]:
        """Cheap (asked at discovery, GPU or not): no triton import, no CUDA initialisation."""
        from engine_cuda.graph import DECODE_MAX_BATCH, PIECEWISE_MAX_TOKENS

        return {
            "device_type": self.device_type,
            "priority": str(self.priority),
            "graph_capture": (f"full graphs for decode batches up to {DECODE_MAX_BATCH}, "
                              f"piecewise around attention up to {PIECEWISE_MAX_TOKENS} "
                              "tokens; --enforce-eager turns them off"),
            "dtypes": ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes),
            "head_sizes": ", ".join(map(str, self.supported_head_sizes)),
            "collectives": self.distributed_backend,
            "kernels": ", ".join(sorted(TRITON_KERNELS)) + " (triton); attention: triton paged",
        }


def _bf16_supported() -> bool:
    if not torch.cuda.is_available():
        return True  # resolved for a GPU we cannot see: every current one has bfloat16
    return torch.cuda.is_bf16_supported()
