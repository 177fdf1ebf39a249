"""Every attribute of vLLM, vllm-ascend or vLLM's API server that ExpertWeave replaces at run time, as data.

PATCHES is the one table of them: what is replaced ("module:Qual.name"), why, on which vLLM lines and by which
platforms. replace_method and replace_attribute take a target and refuse one the table does not list, so the
table is all ExpertWeave changes in vLLM; tests/test_patches.py checks every row against the installed vLLM
(0.32 in the main suite, 0.23 in tests/vllm023), the vllm-ascend rows against the pinned sources
(tests/test_vllm_ascend_hooks.py), and that an engine running ExpertWeave carries no replacement outside it.

Two scopes: PROCESS replaces the attribute of a module or class, once per process, for every engine in it (the
wrappers act only for an engine whose runner carries a weave, worker.py); OBJECT replaces it on one object an
engine owns (one MoE layer's router, one engine client's output processor), once per object, so another engine
in the process never reaches it.

ExpertWeave also adds attributes of its own to objects an engine owns (worker.py's weave on its model runner,
layer.py's layer handle on each woven MoE layer, ascend.py's reroute on each woven AscendFusedMoE) and replaces
the woven layers' expert weight parameters with its own tensors (engine.replace_expert_weight); none of these
replaces vLLM code.
"""

import importlib
from dataclasses import dataclass
from typing import Callable

from ...errors import ExpertWeaveError

PROCESS = "process"  # the attribute of a module or class: every engine in the process runs the replacement
OBJECT = "object"  # the attribute of one object (of the class named) that one engine owns

CPU, CUDA, CPU_023, ASCEND = "CPU", "CUDA", "0.23 CPU", "vllm-ascend"  # the platforms' names (platforms/)
FRONT_END = "front-end"  # `expertweave serve`'s API server (server.py) and the engine clients (admission.py)


@dataclass(frozen=True)
class Patch:
    target: str  # "package.module:Qual.name"; for OBJECT, the class of the objects and the attribute replaced
    why: str
    vllm: tuple[str, ...]  # the vLLM release lines it is made on
    platforms: tuple[str, ...]  # who makes it: platform names, or FRONT_END
    scope: str = PROCESS

    @property
    def owner(self) -> str:
        """"module:Qual" of the module or class holding the attribute (for OBJECT: the objects' class)."""
        return self.target.rpartition(".")[0] if "." in self.target.split(":")[1] else self.target.split(":")[0]

    @property
    def attribute(self) -> str:
        return self.target.split(":")[1].rpartition(".")[2]


_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
_GPU_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_NPU_RUNNER = "vllm_ascend.worker.model_runner_v1:NPUModelRunner"
_ASCEND_MOE = "vllm_ascend.ops.fused_moe.fused_moe"
_LOADED = "after the model is loaded: build this engine's weave over its MoE layers (worker.on_load)"
_SCHEDULED = "before a step: the requests it begins and ends, per adapter (worker.on_schedule)"
_LAID_OUT = ("after the step's batch is laid out, before the forward: each token's adapter row "
             "(worker.on_step; vLLM has no public point there)")
_REFUSE_V2 = ("Model Runner V2 lays batches out differently from the hooks' seams: refused at load when ExpertWeave "
              "is on")
_ROUTER = ("the layer's top-k expert ids, rerouted to the adapters' slots before the expert kernel (as vLLM's MoE "
           "LoRA layer wraps the router)")
_SHARED_MLP = ("the shared-expert MLP's output, overwritten for tokens whose adapter tunes it "
               "(SharedExperts._layer, the model's own MLP)")
_FRONT_END = "adds ExpertWeave's routes and middleware to the app vLLM's build_and_serve builds (server.add_front_end)"
_INIT_STATE = "initialises ExpertWeave's front-end with the app's engine client (server.add_front_end)"

PATCHES: tuple[Patch, ...] = (
    # -- the V1 model runner's seams (platforms/runner.py), one runner class per platform --------------
    Patch(f"{_CPU_RUNNER}.load_model", _LOADED, ("0.32", "0.23"), (CPU, CPU_023)),
    Patch(f"{_CPU_RUNNER}.execute_model", _SCHEDULED, ("0.32", "0.23"), (CPU, CPU_023)),
    Patch(f"{_CPU_RUNNER}._prepare_inputs", _LAID_OUT, ("0.32", "0.23"), (CPU, CPU_023)),
    Patch(f"{_GPU_RUNNER}.load_model", _LOADED, ("0.32",), (CUDA,)),
    Patch(f"{_GPU_RUNNER}.execute_model", _SCHEDULED, ("0.32",), (CUDA,)),
    Patch(f"{_GPU_RUNNER}._prepare_inputs", _LAID_OUT, ("0.32",), (CUDA,)),
    Patch("vllm.v1.worker.gpu.model_runner:GPUModelRunner.load_model", _REFUSE_V2, ("0.32", "0.23"),
          (CPU, CUDA, CPU_023)),
    Patch(f"{_NPU_RUNNER}.load_model", _LOADED, ("0.23",), (ASCEND,)),
    Patch(f"{_NPU_RUNNER}.execute_model", _SCHEDULED, ("0.23",), (ASCEND,)),
    Patch(f"{_NPU_RUNNER}._prepare_inputs", _LAID_OUT, ("0.23",), (ASCEND,)),
    # -- rerouting and shared experts, per MoE layer -------------------------------------------------------
    Patch("vllm.model_executor.layers.fused_moe.router.fused_moe_router:FusedMoERouter.select_experts", _ROUTER,
          ("0.32",), (CPU, CUDA), OBJECT),
    Patch("vllm.model_executor.layers.fused_moe.cpu_fused_moe:CPUFusedMOE.forward_method",
          "the top-k ids the 0.23 CPU kernel selected itself, rerouted before its grouped GEMM", ("0.23",),
          (CPU_023,), OBJECT),
    Patch("vllm.model_executor.models.deepseek_v2:DeepseekV2MLP.forward", _SHARED_MLP, ("0.32", "0.23"),
          (CPU, CPU_023), OBJECT),
    Patch(f"{_ASCEND_MOE}:AscendUnquantizedFusedMoEMethod.apply",
          "a woven layer's apply: its reroute for select_experts, and its dispatch counting every slot", ("0.23",),
          (ASCEND,)),
    Patch(f"{_ASCEND_MOE}:select_experts",
          "the ids select_experts returns inside a woven layer's apply, rerouted before EPLB and dispatch",
          ("0.23",), (ASCEND,)),
    # -- the front-end ---------------------------------------------------------------------------------------
    Patch("vllm.entrypoints.launchers.api_server.entry:build_app", _FRONT_END, ("0.32",), (FRONT_END,)),
    Patch("vllm.entrypoints.launchers.api_server.entry:init_app_state", _INIT_STATE, ("0.32",), (FRONT_END,)),
    Patch("vllm.entrypoints.openai.api_server:build_app", _FRONT_END, ("0.23",), (FRONT_END,)),
    Patch("vllm.entrypoints.openai.api_server:init_app_state", _INIT_STATE, ("0.23",), (FRONT_END,)),
    Patch("vllm.v1.engine.output_processor:OutputProcessor.add_request",
          "checks each request's adapter where the engine client registers it (admission.install)",
          ("0.32", "0.23"), (FRONT_END,), OBJECT),
)


def listed(target: str, scope: str) -> Patch:
    """The table's row for target, which must have this scope."""
    for patch in PATCHES:
        if patch.target == target:
            if patch.scope != scope:
                raise ExpertWeaveError(f"{target} is listed in patching.PATCHES with scope {patch.scope!r}, not "
                                       f"{scope!r}")
            return patch
    raise ExpertWeaveError(f"{target} is not in patching.PATCHES: ExpertWeave replaces nothing its table does not "
                           "list")


def resolve(target: str) -> tuple[object, str]:
    """(owner, attribute name) of "package.module:Qual.name": the module or class holding it."""
    module, qualname = target.split(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def lookup(target: str):
    return getattr(*resolve(target))


def _replace(owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name)
    if getattr(original, "_expertweave", False):
        return
    replacement = make(original)
    replacement._expertweave = True
    replacement.__wrapped__ = original
    setattr(owner, name, replacement)


def replace_method(target: str, make: Callable[[Callable], Callable]) -> None:
    """Sets the module or class attribute target (a PROCESS row of PATCHES) to make(original), once however
    often it is called."""
    listed(target, PROCESS)
    _replace(*resolve(target), make)


def replace_attribute(obj: object, target: str, make: Callable[[Callable], Callable]) -> None:
    """Sets obj's own attribute to make(original), once per object; target (an OBJECT row of PATCHES) names
    obj's class and the attribute."""
    patch = listed(target, OBJECT)
    cls = lookup(patch.owner)
    if not isinstance(obj, cls):
        raise ExpertWeaveError(f"{target}: ExpertWeave's table lists this patch for {cls.__name__} objects, not "
                               f"{type(obj).__name__}")
    _replace(obj, patch.attribute, make)


def wrap_after(target: str, after: Callable) -> None:
    def make(original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            after(self, *args, **kwargs)
            return result
        return wrapped

    replace_method(target, make)


def wrap_before(target: str, before: Callable) -> None:
    def make(original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            before(self, *args, **kwargs)
            return original(self, *args, **kwargs)
        return wrapped

    replace_method(target, make)
