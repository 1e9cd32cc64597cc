"""The CUDA platform: NVIDIA GPUs through torch.cuda, Triton kernels, CUDA graphs and NCCL.

Rule: this class only answers the contract; the work lives next to it (Triton attention in
`attention.py`, kernels in `ops/`, CUDA graphs in `graph.py`, NCCL in `communicator.py`), and
everything heavy (triton) is imported when first asked for, never at discovery.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from platforms.device_module import DeviceModulePlatform
from platforms.interface import (
    ATTENTION_FEATURES,
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    Communicator,
    GraphRunner,
    ModelForward,
)

if TYPE_CHECKING:
    import torch.distributed

    from platforms.config import PlatformConfig
    from platforms.kernels import KernelImpl

# Named op -> module of `engine_cuda.ops` holding its Triton implementation (same name).
TRITON_KERNELS: dict[str, str] = {
    "apply_token_bitmask": "engine_cuda.ops.bitmask",
    "rms_norm": "engine_cuda.ops.norm",
    "fused_add_rms_norm": "engine_cuda.ops.norm",
    "rotary_embedding": "engine_cuda.ops.rotary",
    "silu_and_mul": "engine_cuda.ops.activation",
    "gelu_tanh_and_mul": "engine_cuda.ops.activation",
    "moe_select_experts": "engine_cuda.ops.moe",
    "fused_experts": "engine_cuda.ops.moe",
    "fused_moe": "engine_cuda.ops.moe",
    "lora_shrink": "engine_cuda.ops.lora",
    "lora_expand": "engine_cuda.ops.lora",
}
# Above the torch reference (0); a kernel library can still outbid it through engine_kernels.
TRITON_KERNEL_PRIORITY = 10
# Largest decode batch (requests) captured as one full graph, and largest mixed batch
# (tokens) captured piecewise (see graph.py). Above them the forward is matmul-bound and
# runs eagerly. Here so that `engine plugins` can say so without importing triton.
DECODE_MAX_BATCH = 512
PIECEWISE_MAX_TOKENS = 512


class CudaPlatform(DeviceModulePlatform):
    name = "cuda"
    device_type = "cuda"
    priority = 100
    capabilities = Capabilities(
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        head_sizes=(16, 32, 64, 128, 256),  # what the Triton attention kernel takes
        graph_capture=(f"full graphs for decode batches up to {DECODE_MAX_BATCH}, piecewise "
                       f"around attention up to {PIECEWISE_MAX_TOKENS} tokens; "
                       "--enforce-eager turns them off"),
        distributed_backend="nccl",
        ray_device_resource="GPU",  # Ray's name for CUDA and ROCm devices alike
        pinned_memory=True,
        executes_asynchronously=True,
        measures_peak_memory=True,
        # Decode graphs are captured up to 512. On one warm H100, 1000 x 1024/128 prompts
        # ran alike with 256 and 512 (60.4% and 60.9% of the compute roofline; an earlier
        # 55% vs 62% was Triton compiling in the first run, not this setting); 512 lets more
        # decodes ride along with prefill chunks where outputs are longer.
        default_max_num_seqs=512,
        # The Triton kernel's window and soft-cap switches (ops/attention.py); the graph
        # runner keeps static metadata per KV-cache group (graph.py).
        attention_features=frozenset(ATTENTION_FEATURES),
        notes={"kernels": ", ".join(sorted(TRITON_KERNELS)) + " (triton); attention: triton "
                          "paged"},
    )

    @classmethod
    def is_available(cls) -> bool:
        # A ROCm build of torch also answers torch.cuda; it belongs to the ROCm platform.
        return torch.version.hip is None and torch.cuda.is_available()

    # ---- device & memory (the rest from DeviceModulePlatform over torch.cuda) ----
    def device_module(self):
        return torch.cuda

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

    def validate(self, config: PlatformConfig) -> list[str]:
        problems = super().validate(config)
        num_heads, num_kv_heads = config.model.num_heads, config.model.num_kv_heads
        if num_heads % num_kv_heads:
            problems.append(
                f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads, which "
                "the Triton attention kernel needs; run the model on another platform with "
                "--device."
            )
        world = config.world_size
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

    def graph_runner(self, forward: ModelForward, config: PlatformConfig,
                     attention: Sequence[AttentionBackend] = ()) -> GraphRunner:
        """Eager under --enforce-eager; else full CUDA graphs for decode batches and
        piecewise graphs around attention for small mixed batches (see `graph.py`)."""
        if config.enforce_eager:
            return GraphRunner(forward, config, attention)
        from engine_cuda.graph import CudaGraphRunner

        return CudaGraphRunner(forward, config, attention)

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


def _bf16_supported() -> bool:
    if not torch.cuda.is_available():
        return True  # resolved for a GPU we cannot see: every current one has bfloat16
    return torch.cuda.is_bf16_supported()
