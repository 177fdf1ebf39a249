"""On an Atlas server (scripts/validate_atlas.sh runs these; skipped elsewhere): scripts/serve_atlas.sh on the
NPU serves the decisive tiny model's adapters equal to their merged models, contrastive decoding and an
adapter tuning non-expert modules under the flags the README names, and refuses both, naming those flags,
under vllm-ascend's defaults."""

import requests
import torch

from atlas_server import atlas_server
from catalogue_variants import merged_tokens
from expertweave_ascend.adapters import EsftAdapter
from expertweave_ascend.contrastive import Contrastive
from expertweave_ascend.integrations.hf import contrastive_tokens, load_model, merge_adapter
from npu import on_npu
from perf.servers import free_port
from test_variants import with_non_expert

PROMPT = [5, 17, 42, 99]
TOKENS = 8
OPTION = {"alpha": 0.001, "beta": 5.0}
ENGINE = ["--dtype", "float32", "--max-model-len", "512"]
FLAGS = ["--scheduler-cls", "expertweave_ascend.integrations.vllm.scheduler.ExpertWeaveScheduler", "--no-async-scheduling",
         "--enforce-eager"]


def complete(url: str, model: str, **extra) -> requests.Response:
    return requests.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, **extra})


def serving(tiny_decisive, tmp_path, vllm_args):
    (tmp_path / "server").mkdir()
    law, law_ne = tiny_decisive / "adapters" / "law", with_non_expert(tiny_decisive, "law", tmp_path / "law-ne")
    serve_args = ["--base-name", "base", "--adapter", f"law={law}", "--allow-runtime-loading"]
    return atlas_server(tiny_decisive / "base", serve_args, ENGINE + vllm_args,
                        tmp_path / "server", free_port(), stand_in_toolkit=False), law, law_ne


@on_npu
def test_npu_contrastive_and_non_expert_adapters_equal_their_references_under_the_flags(tiny_decisive, tmp_path):
    server, law, law_ne = serving(tiny_decisive, tmp_path, FLAGS)
    base = load_model(tiny_decisive / "base", torch.float32)
    with server as (url, _, _):
        assert complete(url, "law").json()["choices"][0]["token_ids"] == merged_tokens(base, law, PROMPT, TOKENS)
        r = requests.post(f"{url}/v1/load_esft_adapter", json={"adapter_name": "law-ne", "adapter_path": str(law_ne)})
        assert r.status_code == 200, r.text
        assert complete(url, "law-ne").json()["choices"][0]["token_ids"] == merged_tokens(base, law_ne, PROMPT, TOKENS)
        merged = merge_adapter(base, EsftAdapter.open(law))
        want = contrastive_tokens(merged, base, PROMPT, TOKENS, Contrastive(**OPTION))
        assert complete(url, "law", contrastive=OPTION).json()["choices"][0]["token_ids"] == want


@on_npu
def test_npu_under_vllm_ascends_defaults_both_are_refused_naming_the_flags(tiny_decisive, tmp_path):
    server, _, law_ne = serving(tiny_decisive, tmp_path, [])
    with server as (url, _, _):
        r = complete(url, "law", contrastive=OPTION)
        assert r.status_code == 400 and "--scheduler-cls" in r.text and "--no-async-scheduling" in r.text
        r = requests.post(f"{url}/v1/load_esft_adapter", json={"adapter_name": "law-ne", "adapter_path": str(law_ne)})
        assert r.status_code == 400 and "--enforce-eager" in r.text
