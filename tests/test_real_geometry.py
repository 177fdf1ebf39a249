"""Real ESFT expert selections on DeepSeek-V2-Lite expert shapes, through the real allocator."""

import json
import os
import random

import pytest
import torch

from expertweave_ascend.adapters import read_expert_cfg
from expertweave_ascend.capacity import DEEPSEEK_V2_LITE, plan_memory
from expertweave_ascend.cli import main
from expertweave_ascend.geometry import BaseGeometry
from expertweave_ascend.memory import ExpertMemory, HostBackend, WeightSpec

TASKS = ("law", "intent", "summary")
EXPERT_BYTES = 3 * 2048 * 1408 * 2  # one DeepSeek-V2-Lite routed expert in bf16: 17.3 MB


@pytest.fixture(scope="module")
def lite() -> BaseGeometry:
    return BaseGeometry.from_config(DEEPSEEK_V2_LITE, "BF16")


@pytest.fixture(scope="module")
def selections(esft_data) -> dict:
    return {task: read_expert_cfg(esft_data / "expert_configs" / f"{task}.json") for task in TASKS}


def test_three_real_adapters_fragmentation(lite, selections):
    plan = plan_memory(lite, selections, granularity=2 << 20)
    experts = sum(len(ids) for experts in selections.values() for ids in experts.values())
    assert lite.expert_nbytes == EXPERT_BYTES and plan.moe_layers == 26
    assert plan.adapter_expert_bytes == experts * EXPERT_BYTES
    assert plan.base_expert_bytes == 26 * 64 * EXPERT_BYTES
    assert plan.fragmentation <= 1.02
    # Padding every adapter to its widest layer costs far more than the virtual tensor.
    assert plan.padded_fragmentation > 1.3
    assert plan.padded_bytes == sum(max(map(len, s.values())) for s in selections.values()) * 26 * EXPERT_BYTES


def test_base_experts_take_one_allocation_and_one_map_call_per_tensor(lite, selections):
    """Each layer's w13 and w2 base experts are one contiguous run: 2 x 26 allocations, not one per granule
    (13,728 for DeepSeek-V2-Lite at 2 MiB: 64 experts x (5.5 + 2.75) granules x 26 layers)."""
    plan = plan_memory(lite, selections, granularity=2 << 20)
    assert plan.base_allocations == 2 * 26
    assert plan.base_mapped_bytes // (2 << 20) == 26 * (64 * 11 // 2 + 64 * 11 // 4) == 13728


def test_cli_memory_plan(esft_data, capsys):
    cfgs = [f"--expert-cfg={t}={esft_data / 'expert_configs' / f'{t}.json'}" for t in TASKS]
    assert main(["memory-plan", *cfgs, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["adapters"]) == set(TASKS)
    assert plan["merged_bytes"] > 3 * 30e9  # three merged 15.7B-parameter models in bf16
    assert plan["base_allocations"] == 52 and plan["fragmentation"] <= 1.02 and plan["padded_fragmentation"] > 1.3
    assert sum(a["added_mapped_bytes"] for a in plan["adapters"].values()) == plan["adapter_mapped_bytes"]
    for task, adapter in plan["adapters"].items():
        assert adapter["row"] is None and adapter["experts"] == sum(adapter["experts_per_layer"].values()), task


def test_real_geometry_churn_returns_to_base(lite, selections):
    fds_before = len(os.listdir("/proc/self/fd"))
    backend = HostBackend(2 << 20)
    specs = [WeightSpec("w13", (2816, 2048), torch.bfloat16), WeightSpec("w2", (2048, 1408), torch.bfloat16)]
    slots = 6 * max(len(ids) for s in selections.values() for ids in s.values())
    memory = ExpertMemory(backend, {layer: specs for layer in lite.moe_layers[:6]}, 64, slots)
    base = memory.base_mapped_bytes
    rng = random.Random(3)
    live: list[str] = []
    for cycle in range(500):
        if live and (len(live) == 6 or rng.random() < 0.5):
            memory.release(live.pop(rng.randrange(len(live))))
        else:
            task = rng.choice(TASKS)
            memory.allocate(f"{task}{cycle}", {l: len(ids) for l, ids in selections[task].items()
                                               if l in memory.tensors})
            live.append(f"{task}{cycle}")
    for owner in live:
        memory.release(owner)
    assert memory.mapped_bytes == base
    assert memory.pool.used_bytes == base
    assert backend.physical_bytes_resident() == 0  # nothing was written, and freed granules were punched out
    memory.close()
    assert memory.mapped_bytes == 0
    backend.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
