"""The AMD ROCm platform: HIP through torch's `cuda` device API, with engine-cuda's Triton
kernels, graph capture and collectives.

Rule: ROCm is selected only on ROCm's own signals (a HIP build of torch, `torch.version.hip`,
seeing a GPU; amdsmi for the GPU names), so a CUDA machine never selects it, and the CUDA
platform never selects a ROCm machine (it checks `torch.version.hip is None`). Everything
else is engine-cuda's: its Triton attention and kernels compile for AMD GPUs through Triton's
HIP backend, its graph runner captures HIP graphs through `torch.cuda.CUDAGraph`, and torch's
`nccl` process-group backend is RCCL on ROCm. Depending on engine-cuda (not copying it) keeps
one set of kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from engine_cuda.platform import CudaPlatform


def amd_gpu_names() -> list[str]:
    """GPU market names from amdsmi, or [] where amdsmi is missing or fails."""
    try:
        import amdsmi
    except ImportError:
        return []
    try:
        amdsmi.amdsmi_init()
        try:
            return [amdsmi.amdsmi_get_gpu_asic_info(h).get("market_name", "AMD GPU")
                    for h in amdsmi.amdsmi_get_processor_handles()]
        finally:
            amdsmi.amdsmi_shut_down()
    except Exception:  # a driver problem must not break discovery of other platforms
        return []


class RocmPlatform(CudaPlatform):
    name = "rocm"
    priority = 100  # same rank as CUDA: the two are never available together
    capabilities = dataclasses.replace(
        CudaPlatform.capabilities,
        distributed_backend="nccl",  # RCCL in ROCm builds of torch
        notes={"collectives": "nccl (RCCL)",
               "kernels": CudaPlatform.capabilities.notes["kernels"]
               + " (engine-cuda's, via Triton's HIP backend)"},
    )

    @classmethod
    def is_available(cls) -> bool:
        return torch.version.hip is not None and torch.cuda.is_available()

    def describe(self) -> dict[str, Optional[str]]:
        info = super().describe()
        if torch.version.hip is not None:
            info["hip"] = str(torch.version.hip)
            names = amd_gpu_names()
            if names:
                info["gpus"] = ", ".join(names)
        return info
