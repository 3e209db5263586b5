"""Which implementation computes what, chosen once per device: attention and the elementwise
ops when the model is built, the LoRA backend when the engine is. The Triton kernels and
compiled ops run on CUDA; the plain-torch references everywhere else. A test may build either
on any device by passing the objects (the kernels run on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_worker.model.attention import (
    PagedAttention,
    TorchPagedAttention,
    TritonPagedAttention,
)
from services.gpu_worker.model.fused_ops import ElementwiseOps
from services.gpu_worker.model.lora_backend import LoraBackend, TorchLoraBackend, TritonLoraBackend


@dataclass(frozen=True)
class ModelBackends:
    attention: PagedAttention
    elementwise: ElementwiseOps

    @classmethod
    def reference(cls) -> ModelBackends:
        return cls(TorchPagedAttention(), ElementwiseOps.plain())

    @classmethod
    def for_device(cls, device: torch.device, fuse_elementwise: bool = True) -> ModelBackends:
        """Kernels on CUDA (the elementwise ops too, unless `fuse_elementwise` is off:
        benchmarks compare both); the references elsewhere."""
        if device.type != "cuda":
            return cls.reference()
        fused = ElementwiseOps.kernels() if fuse_elementwise else ElementwiseOps.plain()
        return cls(TritonPagedAttention(), fused)


def lora_backend_for(device: torch.device) -> LoraBackend:
    return TritonLoraBackend() if device.type == "cuda" else TorchLoraBackend()
