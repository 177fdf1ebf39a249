"""The memory and verify reports: built by MemoryReport.of from real expert memory, rendered as JSON and
read back from it (what crosses vLLM's RPC and HTTP), and as text."""

import json

import pytest
import torch

from expertweave_ascend.memory import ExpertMemory, HostBackend, WeightSpec
from expertweave_ascend.reports import (AdapterMemory, MemoryReport, VerifyReport, VerifyRow, format_plan,
                                        format_verify)

GRANULE = 64 << 10
SPECS = [WeightSpec("w13", (64, 96), torch.float32), WeightSpec("w2", (96, 32), torch.float32)]
EXPERT = (64 * 96 + 96 * 32) * 4


@pytest.fixture
def memory():
    backend = HostBackend(GRANULE)
    memory = ExpertMemory(backend, {1: SPECS, 2: SPECS}, 8, 6)
    yield memory
    memory.close()
    backend.close()


def planned(memory: ExpertMemory) -> dict[str, AdapterMemory]:
    adapters = {}
    for name, counts in {"law": {1: 3, 2: 1}, "math": {1: 0, 2: 2}}.items():
        before = memory.mapped_bytes
        memory.allocate(name, counts)
        adapters[name] = AdapterMemory.of(memory, counts, added_mapped_bytes=memory.mapped_bytes - before)
    return adapters


def test_the_report_counts_what_the_memory_holds(memory):
    report = MemoryReport.of(memory, planned(memory), 6, model_bytes=10_000)
    law, math = report.adapters["law"], report.adapters["math"]
    assert (law.experts, law.max_per_layer, law.bytes) == (4, 3, 4 * EXPERT)
    assert (math.experts_per_layer, math.bytes) == ({2: 2}, 2 * EXPERT)  # a layer it does not tune is left out
    assert report.adapter_expert_bytes == 6 * EXPERT
    assert report.adapter_mapped_bytes == memory.mapped_bytes - memory.base_mapped_bytes
    assert report.adapter_mapped_bytes == law.added_mapped_bytes + math.added_mapped_bytes
    assert report.fragmentation == report.adapter_mapped_bytes / (6 * EXPERT)
    assert report.padded_bytes == (3 + 2) * 2 * EXPERT and report.padded_fragmentation == 10 / 6
    assert (report.merged_bytes, report.moe_layers, report.adapter_slots_per_layer) == (20_000, 2, 6)
    assert report.base_expert_bytes == 2 * 8 * EXPERT and report.base_allocations == 4


def test_json_round_trips_through_text(memory):
    report = MemoryReport.of(memory, planned(memory), 6)
    data = json.loads(json.dumps(report.to_json()))  # layer keys become strings, as over HTTP
    assert data["fragmentation"] == report.fragmentation and data["merged_bytes"] is None
    assert data["adapters"]["law"]["experts"] == 4 and data["adapters"]["law"]["max_per_layer"] == 3
    assert MemoryReport.from_json(data) == report


def test_an_empty_memory_has_no_fragmentation(memory):
    report = MemoryReport.of(memory, {}, 6)
    assert report.fragmentation is None and report.padded_fragmentation is None
    assert report.to_json()["fragmentation"] is None


def test_verify_report_is_ok_only_when_every_row_is_equal(memory):
    report = VerifyReport("vllm", "logprobs", "cpu", "base", "auto", 4, VerifyRow("p", "out", True, 0.0),
                          {"law": VerifyRow("q", "text", True, 0.0)}, MemoryReport.of(memory, planned(memory), 6))
    assert report.ok and report.to_json()["ok"] is True
    assert report.to_json()["adapters"]["law"] == {"prompt": "q", "output": "text", "tokens_equal": True,
                                                  "max_abs_diff": 0.0, "differs_from_base": None,
                                                  "agreement": None, "mean_kl": None}
    wrong = VerifyReport(**{**vars(report), "adapters": {"law": VerifyRow("q", "text", False, 0.5)}})
    assert not wrong.ok
    text = format_verify(wrong)
    assert "max|d logprobs|" in text and "MISMATCH" in text
    law_line = next(line for line in text.splitlines() if line.startswith("law"))
    assert law_line.split()[:4] == ["law", "4", str(4 * EXPERT), "NO"]


def test_the_plan_text_names_each_adapter_and_the_base_allocations(memory):
    text = format_plan(MemoryReport.of(memory, planned(memory), 6, model_bytes=10_000))
    assert [line.split()[:3] for line in text.splitlines()[1:3]] == [["law", "4", "3"], ["math", "2", "2"]]
    assert "4 physical allocations and map calls" in text and "merged copies" in text
