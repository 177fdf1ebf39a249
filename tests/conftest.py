import shutil
from pathlib import Path

import pytest

from expertweave_ascend.geometry import BaseGeometry
from expertweave_ascend.tiny import make_tiny

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "esft"


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a run of a minute or more of its own (the soak, pip's resolves "
                                       "over PyPI); `make test-long` runs these, `make test-main` leaves them out")


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
