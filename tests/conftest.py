import os
import shutil
from pathlib import Path

import pytest
import torch

from expertweave_ascend.geometry import BaseGeometry
from expertweave_ascend.tiny import make_tiny

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "esft"


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a run of a minute or more of its own (the soak, pip's resolves "
                                       "over PyPI); `make test-long` runs these, `make test-main` leaves them out")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # `make test-main` runs pytest-xdist workers
    if workers > 1:
        # vLLM's CPU engines pin their worker's threads to core 0 by default ("auto" binding), so both pytest
        # workers' engines would share one core; unbound, each takes the core that is free. One thread per
        # worker and per engine it starts: two OpenMP teams on two cores spin waiting for each other.
        # (A test that sets its own binding keeps it.)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The groups that start vLLM engines or servers, slowest first (pytest --durations on this machine kind, about
# 125 s down to 15 s of one worker's time): xdist hands a free worker the next group in collection order, so
# these go first and the quick modules fill in at the end, and the two workers finish together.
SLOWEST_FIRST = ("test_vllm", "test_server", "test_server_tiering", "decisive_server", "test_readme_serve",
                 "test_engines_in_one_process", "test_vllm_variants", "test_vllm_sharing", "test_vllm_shared_experts",
                 "test_launch", "test_server_runtime_loading", "test_vllm_tp", "test_vllm_contrastive",
                 "test_data_parallel", "test_frontend")


def pytest_collection_modifyitems(config, items):
    """With `--dist loadgroup`, one worker runs each module whole (its module-scoped engines start once), and the
    modules that share the session's decisive server run on one worker, which starts it once."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    sharing = {item.module.__name__ for item in items if "decisive_server" in item.fixturenames}
    groups = {}
    for item in items:
        module = item.module.__name__
        groups[item] = "decisive_server" if module in sharing else module
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    rank = {group: i for i, group in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The embedded tiny model with 3 adapters (law, math, code), built once per test session."""
    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, adapters=3, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_decisive(tmp_path_factory) -> Path:
    """The tiny model built with decisive logits (tiny.make_decisive) and 4 adapters (law, math, code,
    intent): greedy outputs do not depend on batch composition, so concurrent serving can be compared
    with serving alone, token for token."""
    out = tmp_path_factory.mktemp("tiny-decisive")
    make_tiny(out, adapters=4, seed=0, decisive=True)
    return out


@pytest.fixture(scope="session")
def decisive_server(tiny_decisive, tmp_path_factory) -> str:
    """One `expertweave serve` on the decisive tiny model for the server tests that need no options of their
    own (test_server_concurrency, test_server_contrastive): the base as "base", law, math and code loaded at
    start, runtime loading on. Its URL; it runs until the session ends."""
    from serving import ENGINE_ARGS, running_server

    adapters = tiny_decisive / "adapters"
    argv = ["serve", str(tiny_decisive / "base"), "--base-name", "base", "--allow-runtime-loading",
            *[f"--adapter={name}={adapters / name}" for name in ("law", "math", "code")], "--", *ENGINE_ARGS]
    with running_server(argv, tmp_path_factory.mktemp("decisive-server") / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def geometry(tiny) -> BaseGeometry:
    return BaseGeometry.from_checkpoint(tiny / "base")


@pytest.fixture
def adapter_copy(tiny, tmp_path):
    """A writable copy of one tiny adapter, to damage in a test; a second copy of one adapter gets a
    directory of its own (law, law-2, ...)."""
    def copy(name: str = "law") -> Path:
        dst = tmp_path / name
        number = 1
        while dst.exists():
            number += 1
            dst = tmp_path / f"{name}-{number}"
        shutil.copytree(tiny / "adapters" / name, dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def esft_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real ESFT data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def make_weave(tiny, geometry):
    """make(**WeaveConfig fields) -> an ExpertWeave over the tiny model's transformers integration (64 KiB
    granules, 32 adapter slots unless given), closed after the test."""
    from expertweave_ascend.integrations.hf import load_model, moe_layer_handles
    from expertweave_ascend.weave import ExpertWeave, WeaveConfig

    made = []

    def make(**config):
        handles, _ = moe_layer_handles(load_model(tiny / "base"))
        config.setdefault("granularity", 64 << 10)
        config.setdefault("adapter_slots", 32)
        weave = ExpertWeave(geometry, handles, WeaveConfig(**config))
        made.append(weave)
        return weave

    yield make
    for weave in made:
        weave.close()
