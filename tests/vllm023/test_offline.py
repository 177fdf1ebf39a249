"""The offline ExpertWeaveLLM on vLLM 0.23, in this process (the decisive tiny model, law and math loaded):
outputs equal the merged models (transformers references), contrastive decoding and its twins on ExpertWeave's
scheduler over vLLM 0.23's (tests/test_vllm_contrastive.py's tests, run again here), adapters tuning
non-expert modules switched between steps, and the engine platform this line gets."""

import torch

from catalogue_variants import merged_tokens
from expertweave_ascend.integrations.hf import load_model
from expertweave_ascend.integrations.vllm import platforms
from expertweave_ascend.integrations.vllm.engine import SCHEDULER
from test_step_policies import (  # noqa: F401  (the main suite's tests)
    test_contrastive_requests_run_while_variants_switch,
    test_an_empty_step_of_another_variant_is_groupings_and_preempts_no_pair,
    test_an_empty_step_its_members_ahead_caused_is_pairings_and_preempts_them,
    test_a_partner_held_back_for_a_starved_variant_is_groupings_doing,
    test_without_variants_a_member_ahead_is_pairings_and_with_nothing_hidden_nobodys,
    test_a_variant_that_finds_nothing_to_run_alone_passes_its_turn,
    test_grouping_serves_variants_first_come_first_served_within_a_quantum,
)
from test_variants import with_non_expert
from test_vllm_contrastive import (  # noqa: F401  (the main suite's tests and fixtures)
    references,
    llm,
    test_a_mixed_batch_equals_the_reference_for_each_request,
    test_beta_zero_equals_plain_adapter_decoding,
    test_the_twin_is_hidden_from_outputs_and_metrics,
    test_aborting_a_contrastive_request_frees_its_twin,
    test_a_request_whose_twin_ends_first_fails_and_leaves_nothing,
    test_seeded_sampling_repeats_whatever_the_batch,
    test_refusals_name_the_problem,
    test_an_engine_that_cannot_pair_requests_is_named_in_the_refusal,
    test_an_engine_whose_kv_cache_holds_one_longest_sequence_refuses,
)
from test_vllm_variants import PROMPTS, TOKENS
from test_vllm_variants import generate as generate_variants
from vllm_ascend_facts import VLLM_NAMES


def test_this_engine_runs_the_023_cpu_platform_with_expertweaves_scheduler(llm):
    from expertweave_ascend.integrations.vllm.platforms.cpu023 import Vllm023Cpu

    assert type(platforms.current()) is Vllm023Cpu
    config = llm.llm.llm_engine.vllm_config
    assert config.scheduler_config.scheduler_cls == SCHEDULER and not config.scheduler_config.async_scheduling
    assert config.model_config.use_mla is False, "VLLM_MLA_DISABLE=1, set by the platform"
    assert llm.memory_report().moe_layers == 3


def test_the_vllm_names_only_the_npu_path_imports_exist_on_vllm_023():
    import importlib

    for module, name in VLLM_NAMES:
        assert hasattr(importlib.import_module(module), name), f"vLLM 0.23 {module} has no {name}"


def test_a_non_expert_adapter_loaded_at_run_time_equals_its_merged_model_beside_the_others(llm, tiny_decisive,
                                                                                         tmp_path):
    """Requests of the base, law, math and law-ne sent together: ExpertWeave's scheduler on vLLM 0.23's gives
    law-ne steps of their own, each with its weights switched in, and every output equals its merged model."""
    from expertweave_ascend.integrations.vllm import worker

    adapters = {"law": tiny_decisive / "adapters" / "law", "math": tiny_decisive / "adapters" / "math",
                "law-ne": with_non_expert(tiny_decisive, "law", tmp_path / "law-ne")}
    before = llm.memory_report()
    llm.load_adapter("law-ne", adapters["law-ne"])
    try:
        names = [None, "law-ne", "law", "law-ne", "math", None]
        got = generate_variants(llm, names)
        base_model = load_model(tiny_decisive / "base", torch.float32)
        for i, name in enumerate(names):
            adapter = None if name is None else adapters[name]
            want = merged_tokens(base_model, adapter, PROMPTS[i % len(PROMPTS)], TOKENS)
            assert got[i] == want, name
        switcher = llm.llm.collective_rpc(worker.weave_of)[0].switcher
        assert switcher.switches >= 1, "law-ne's steps ran with its own non-expert weights"
    finally:
        llm.unload_adapter("law-ne")
    assert llm.memory_report() == before
