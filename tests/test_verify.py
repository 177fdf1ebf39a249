"""`expertweave verify --engine hf` and the tiny model it runs on."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from expertweave_ascend.cli import main
from expertweave_ascend.integrations import hf
from expertweave_ascend.tiny import make_tiny
from expertweave_ascend.verify import verify_hf
from expertweave_ascend.weave import WeaveConfig


def tree_digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_tiny_is_deterministic_per_seed(tiny, tmp_path):
    make_tiny(tmp_path / "again", adapters=3, seed=0)
    make_tiny(tmp_path / "other", adapters=3, seed=1)
    assert tree_digest(tmp_path / "again") == tree_digest(tiny)
    assert tree_digest(tmp_path / "other") != tree_digest(tiny)


def test_tiny_base_is_a_real_deepseek_v2_checkpoint(tiny):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny / "base")
    assert config.architectures == ["DeepseekV2ForCausalLM"]
    assert config.num_hidden_layers >= 3 and config.first_k_dense_replace == 1
    assert config.n_routed_experts >= 16 and config.num_experts_per_tok >= 4 and config.n_shared_experts >= 1
    assert (config.kv_lora_rank, config.qk_rope_head_dim) == (512, 64)
    assert config.hidden_size % 32 == 0 and config.moe_intermediate_size % 32 == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny / "base")
    ids = tokenizer("the court held that a contract")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the court held that a contract"


@pytest.fixture(scope="module")
def report(tiny):
    adapters = {name: tiny / "adapters" / name for name in ("law", "math", "code")}
    return verify_hf(tiny / "base", adapters, max_new_tokens=16,
                     config=WeaveConfig(max_adapters=3, adapter_slots=24, granularity=64 << 10))


def test_mixed_batch_equals_merged_models(report):
    assert report.ok and report.compared == "logits"
    assert report.base.tokens_equal and report.base.max_abs_diff < 1e-4
    assert set(report.adapters) == {"law", "math", "code"}
    for name, row in report.adapters.items():
        assert row.tokens_equal, name
        assert row.max_abs_diff < 1e-4, name
        assert row.differs_from_base, f"{name}: greedy output equals the base's; adapter has no effect"


def test_verify_memory_figures(report):
    m = report.memory
    assert m.fragmentation == m.adapter_mapped_bytes / m.adapter_expert_bytes
    assert 1.0 <= m.fragmentation < 1.1
    assert m.padded_bytes > m.adapter_expert_bytes
    assert m.merged_bytes > 3 * m.base_expert_bytes
    assert m.adapter_expert_bytes == sum(a.bytes for a in m.adapters.values())
    assert {name: a.row for name, a in m.adapters.items()} == {"law": 1, "math": 2, "code": 3}


def test_verify_detects_a_wrong_expert_layout(tiny, monkeypatch):
    # Swapping gate and up while packing is the kind of layout bug verify exists to catch.
    monkeypatch.setattr(hf.HfMoELayer, "pack_expert",
                        lambda self, gate, up, down: {"w13": torch.cat([up, gate]).to(self.dtype),
                                                      "w2": down.to(self.dtype)})
    result = verify_hf(tiny / "base", {"law": tiny / "adapters" / "law"}, max_new_tokens=16,
                       config=WeaveConfig(max_adapters=1, adapter_slots=8, granularity=64 << 10))
    assert not result.ok
    assert not result.adapters["law"].tokens_equal or result.adapters["law"].max_abs_diff > 1e-3
    assert result.base.tokens_equal


def test_cli_verify_json(tiny, capsys):
    code = main(["verify", "--engine", "hf", "--base", str(tiny / "base"), "--adapter",
                 f"law={tiny / 'adapters' / 'law'}", "--granularity", "64KiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] and out["engine"] == "hf" and out["compared"] == "logits"
    assert out["adapters"]["law"]["tokens_equal"] is True and out["adapters"]["law"]["max_abs_diff"] < 1e-4
    memory = out["memory"]
    assert memory["granularity"] == 64 << 10
    assert memory["fragmentation"] == memory["adapter_mapped_bytes"] / memory["adapter_expert_bytes"]
    law = memory["adapters"]["law"]
    assert law["row"] == 1 and law["experts"] == sum(law["experts_per_layer"].values())


def test_cli_verify_bad_adapter_is_one_line_error(tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "verify", "--base", str(tiny / "base"),
                             "--adapter", f"x={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'expert_cfg.json'}: missing"]


def test_cli_verify_device_is_for_the_transformers_engine(tiny):
    result = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "verify", "--engine", "vllm",
                             "--base", str(tiny / "base"), "--adapter", f"law={tiny / 'adapters' / 'law'}",
                             "--device", "cuda"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: verify: --device is for --engine hf; vLLM runs on its "
                                                  "platform's device"]


def test_backend_for_a_device():
    from expertweave_ascend.errors import MemoryBackendError
    from expertweave_ascend.memory import HostBackend, backend_for

    backend = backend_for("cpu", 64 << 10)
    assert isinstance(backend, HostBackend) and backend.granularity == 64 << 10
    backend.close()
    with pytest.raises(MemoryBackendError, match=r"no virtual-memory backend for device meta here"):
        backend_for("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA build of torch")
def test_mixed_batch_equals_merged_models_on_the_gpu(tiny):
    """The base and three adapters in one batch on CUDA virtual memory, rerouted by the Triton kernel."""
    adapters = {name: tiny / "adapters" / name for name in ("law", "math", "code")}
    result = verify_hf(tiny / "base", adapters, max_new_tokens=16, device="cuda")
    assert result.ok, result
    assert result.memory.granularity == 2 << 20
    for row in [result.base, *result.adapters.values()]:
        assert row.max_abs_diff < 1e-3
