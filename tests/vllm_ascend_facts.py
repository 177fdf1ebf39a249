"""What the Ascend path assumes of the pinned vllm-ascend 0.23.0.post1 (on vLLM 0.23) and torch-npu
releases, as tables tests/test_vllm_ascend_hooks.py checks against their sources: every name
VllmAscend (expertweave_ascend/integrations/vllm/platforms/ascend.py) looks up, with its parameters;
what the bodies behind them do; the vLLM names imported; the torch_npu names the plugin and the
scripts call."""

from expertweave_ascend.integrations.vllm.platforms.ascend import VllmAscend as A
from source_facts import Fact, Hook, NpuOp

LOAD_MODEL = Hook(f"{A.MODEL_RUNNER}.{A.LOAD_MODEL}", ("self",))
PREPARE_INPUTS = Hook(f"{A.MODEL_RUNNER}.{A.PREPARE_INPUTS}", ("self", "scheduler_output", "num_scheduled_tokens"))
EXECUTE_MODEL = Hook(f"{A.MODEL_RUNNER}.{A.EXECUTE_MODEL}", ("self", "scheduler_output", "intermediate_tensors"))
GET_MODEL = Hook(f"{A.MODEL_RUNNER}.{A.GET_MODEL}", ("self",))
MOE_LAYER = Hook(A.MOE_LAYER, ("self",), "vllm_ascend/ops/fused_moe/fused_moe_0_23_0.py")
MOE_METHOD = Hook(A.MOE_METHOD, ("self", "moe", "tid2eid"))
MOE_APPLY = Hook(A.MOE_APPLY, ("self", "layer", "x", "use_grouped_topk", "top_k", "router_logits"))
SELECT_EXPERTS = Hook(A.SELECT_EXPERTS, ("hidden_states", "router_logits", "top_k", "use_grouped_topk"),
                      "vllm_ascend/ops/fused_moe/experts_selector.py")
ALLGATHER_DISPATCH = Hook("vllm_ascend.ops.fused_moe.token_dispatcher:TokenDispatcherWithAllGather.token_dispatch",
                          ("self", "token_dispatch_input"))
ENABLE_SP = Hook(A.ENABLE_SP, ("vllm_config", "enable_shared_expert_dp"))
GET_ASCEND_CONFIG = Hook(A.GET_ASCEND_CONFIG, ())
GLOBAL_PATCH = Hook(A.GLOBAL_PATCH, (), "vllm_ascend/__init__.py")
HOOKS = (LOAD_MODEL, PREPARE_INPUTS, EXECUTE_MODEL, GET_MODEL, MOE_LAYER, MOE_METHOD, MOE_APPLY, SELECT_EXPERTS,
         ALLGATHER_DISPATCH, ENABLE_SP, GET_ASCEND_CONFIG, GLOBAL_PATCH)

_FUSED = "vllm_ascend/ops/fused_moe/fused_moe.py"
_LAYER = "vllm_ascend/ops/fused_moe/fused_moe_0_23_0.py"
_DISPATCH = "vllm_ascend/ops/fused_moe/token_dispatcher.py"
_PREPARE = "vllm_ascend/ops/fused_moe/prepare_finalize.py"
_CONTEXT = "vllm_ascend/ascend_forward_context.py"
_RUNNER = "vllm_ascend/worker/model_runner_v1.py"
FACTS = (
    # rerouting: ids come from the module's select_experts, EPLB maps them afterwards
    Fact(_FUSED, "AscendUnquantizedFusedMoEMethod.apply", "calls", "select_experts"),
    Fact(_FUSED, "AscendUnquantizedFusedMoEMethod.apply", "calls", "moe_comm_method.fused_experts"),
    Fact("vllm_ascend/ops/fused_moe/experts_selector.py", "select_experts", "returns", "topk_weights, topk_ids"),
    Fact("vllm_ascend/ops/fused_moe/moe_comm_method.py", "MoECommMethod.fused_experts", "reads",
         "fused_experts_input.routing.log2phy"),
    Fact(_LAYER, "AscendFusedMoE.forward_impl", "calls", "self.quant_method.apply", ("layer", "x", "router_logits")),
    # weights: transposed after loading, and how the layer tells its parallel layout
    Fact(_FUSED, "AscendUnquantizedFusedMoEMethod.process_weights_after_loading", "writes", "layer.w13_weight"),
    Fact(_FUSED, "AscendUnquantizedFusedMoEMethod.process_weights_after_loading", "writes", "layer.w2_weight"),
    Fact(_FUSED, "AscendUnquantizedFusedMoEMethod.process_weights_after_loading", "calls", "maybe_trans_nz"),
    Fact(_LAYER, "AscendFusedMoE.__init__", "writes", "self.moe_config.dp_group"),
    Fact(_LAYER, "AscendFusedMoE.__init__", "writes", "self.mix_placement"),
    # what check_options reads: the options that break the slot layout
    Fact("vllm_ascend/ascend_config.py", "AscendConfig.__init__", "writes", "self.mix_placement"),
    Fact("vllm_ascend/ascend_config.py", "AscendConfig.__init__", "writes", "self.weight_prefetch_config"),
    Fact("vllm_ascend/ascend_config.py", "WeightPrefetchConfig.__init__", "writes", "self.enabled"),
    Fact("vllm_ascend/ascend_config.py", "WeightPrefetchConfig.__init__", "writes", "self.prefetch_ratio"),
    Fact(_FUSED, "AscendUnquantizedFusedMoEMethod.apply", "reads", "model_config.enable_return_routed_experts"),
    # Model Runner V2 never runs on vLLM 0.23.0: the NPU worker falls back to the V1 runner the hooks patch
    Fact("vllm_ascend/worker/worker.py", "NPUWorker.__init__", "writes", "self.use_v2_model_runner", value="False"),
    Fact(_LAYER, "AscendFusedMoE.__init__", "reads", "self.moe_config.ep_size"),
    Fact(_PREPARE, "PrepareAndFinalizeWithAllGather._prepare_with_dp_group", "reads", "self.moe_config.dp_size"),
    Fact(_PREPARE, "PrepareAndFinalizeWithAllGather._prepare_with_dp_group", "reads", "self.moe_config.pcp_size"),
    # the expert count the AllGather dispatch sees
    Fact(_DISPATCH, "TokenDispatcherWithAllGather.__init__", "writes", "self.num_experts_local"),
    Fact(_DISPATCH, "TokenDispatcherWithAllGather.token_dispatch", "reads", "self.num_experts_local"),
    Fact(_DISPATCH, "TokenDispatcherWithAllGather.token_dispatch", "calls", "DeviceOperator.npu_moe_init_routing",
         ("expert_num", "active_expert_range")),
    Fact("vllm_ascend/ops/fused_moe/moe_comm_method.py", "MoECommMethod.__init__", "writes", "self.token_dispatcher"),
    # the tokens select_experts sees
    Fact(_PREPARE, "PrepareAndFinalizeWithAllGather.prepare", "calls", "enable_sp"),
    Fact(_PREPARE, "PrepareAndFinalizeWithAllGather.prepare", "calls", "enable_sp_by_pass"),
    Fact(_PREPARE, "PrepareAndFinalizeWithAllGather._prepare_with_dp_group", "reads",
         "_EXTRA_CTX.max_tokens_across_dp"),
    Fact(_PREPARE, "PrepareAndFinalizeWithAllGather._prepare_with_dp_group", "calls",
         "self.moe_config.dp_group.all_gather"),
    Fact(_PREPARE, "PrepareAndFinalizeWithAllGather._prepare_with_ep_group", "calls",
         "torch.ops.vllm.maybe_all_gather_and_maybe_unpad"),
    Fact("vllm_ascend/ops/register_custom_ops.py", "_maybe_all_gather_and_maybe_unpad_impl", "reads",
         "_EXTRA_CTX.padded_length"),
    Fact("vllm_ascend/ops/register_custom_ops.py", "_maybe_all_gather_and_maybe_unpad_impl", "reads",
         "dp_metadata.num_tokens_across_dp_cpu"),
    Fact(_CONTEXT, "set_ascend_forward_context", "writes", "forward_context.moe_comm_method"),
    # ExpertWeave's ops find their layer by its name in vLLM's forward context (no_compile_layers)
    Fact(_CONTEXT, "set_ascend_forward_context", "calls", "set_forward_context"),
    Fact(_CONTEXT, "set_ascend_forward_context", "writes", "forward_context.flash_comm_v1_enabled"),
    Fact(_CONTEXT, "set_ascend_forward_context", "writes", "forward_context.max_tokens_across_dp"),
    Fact(_CONTEXT, "set_ascend_forward_context", "writes", "forward_context.padded_length"),
    Fact("vllm_ascend/ascend_config.py", "AscendConfig.__init__", "writes", "self.enable_sp_by_pass"),
    # the model runner
    Fact(_RUNNER, "NPUModelRunner._prepare_inputs", "writes", "self.query_start_loc.np"),
    Fact(_RUNNER, "NPUModelRunner.execute_model", "calls", "self.synchronize_input_prep"),
    Fact(_RUNNER, "NPUModelRunner.execute_model", "calls", "self._prepare_inputs"),
    Fact(_RUNNER, "NPUModelRunner.load_model", "writes", "self.model"),
    Fact(_RUNNER, "NPUModelRunner.load_model", "writes", "self.model_memory_usage"),
    Fact("vllm_ascend/worker/worker.py", "NPUWorker.determine_available_memory", "reads",
         "self.model_runner.model_memory_usage"),
    Fact(_RUNNER, "NPUModelRunner.execute_model", "calls", "self._update_states"),
    Fact("vllm_ascend/platform.py", "NPUPlatform", "writes", "device_type", value="'npu'"),
    Fact("vllm_ascend/__init__.py", "register_connector", "calls", "_ensure_global_patch"),
    Fact("vllm_ascend/worker/worker.py", "NPUWorker.__init__", "calls", "adapt_patch"),
)

# vLLM 0.23 names only VllmAscend's own code paths import (module, name): tests/vllm023 imports each on vLLM 0.23.
VLLM_NAMES = (
    ("vllm.forward_context", "get_forward_context"),
    ("vllm.distributed", "get_dp_group"),
    ("vllm.platforms", "current_platform"),
)

TORCH_NPU_OPS = (
    NpuOp("get_npu_format", ("self",), "native", "VllmAscend.check_layer: refuse NZ expert weights"),
    NpuOp("npu_moe_gating_top_k_softmax", ("x", "finished", "k"), "meta", "scripts/reroute_share.py"),
    NpuOp("npu_moe_init_routing_v2", ("x", "expert_idx", "active_num", "expert_num", "expert_tokens_num_type",
                                      "expert_tokens_num_flag", "active_expert_range"), "meta",
          "scripts/reroute_share.py"),
    NpuOp("npu_grouped_matmul", ("x", "weight", "group_list", "split_item", "group_type", "group_list_type"), "meta",
          "scripts/reroute_share.py"),
    NpuOp("npu_swiglu", ("x", "dim"), "meta", "scripts/reroute_share.py"),
    NpuOp("npu_moe_token_unpermute", ("permuted_tokens", "sorted_indices", "probs"), "meta",
          "scripts/reroute_share.py"),
    NpuOp("_C._construct_storage_from_data_pointer", (), "binding", "AclBackend.tensor: NPU storage over a mapping"),
    NpuOp("_C._construct_NPU_Tensor_From_Storage_And_Metadata", (), "binding", "AclBackend.tensor"),
    NpuOp("npu.empty_cache", (), "python:torch_npu/npu/memory.py", "VllmAscend.weave_installed"),
    NpuOp("npu.synchronize", ("device",), "python:torch_npu/npu/utils.py",
          "AclBackend.synchronize (drains the task queue), scripts/reroute_share.py"),
    NpuOp("npu.set_device", ("device",), "python:torch_npu/npu/utils.py", "AclBackend, scripts/reroute_share.py"),
    NpuOp("npu.get_device_name", ("device_name",), "python:torch_npu/npu/__init__.py", "scripts/reroute_share.py"),
    NpuOp("profiler.profiler.analyse", ("profiler_path",), "python:torch_npu/profiler/profiler.py",
          "scripts/profile_msprof.sh"),
)
