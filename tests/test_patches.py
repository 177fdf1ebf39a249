"""The table of everything ExpertWeave replaces in vLLM (patching.PATCHES), against the installed vLLM: every
row made on this vLLM line resolves here (vLLM 0.32 in the main suite, 0.23 in tests/vllm023; the vllm-ascend
rows are checked against the pinned sources in tests/test_vllm_ascend_hooks.py), each platform's own targets
are its rows, a target outside the table is refused, and an engine running ExpertWeave, once it has served,
carries no replacement of ExpertWeave's that the table does not list."""

import gc
import inspect
import re
import sys
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import expertweave_ascend  # noqa: E402
from expertweave_ascend.errors import ExpertWeaveError  # noqa: E402
from expertweave_ascend.integrations.vllm import patching, platforms  # noqa: E402
from expertweave_ascend.integrations.vllm.patching import (  # noqa: E402
    ASCEND, FRONT_END, OBJECT, PATCHES, PROCESS, lookup, replace_attribute, replace_method, resolve)
from expertweave_ascend.integrations.vllm.platforms.ascend import VllmAscend  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.cpu import VllmCpu  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.cpu023 import Vllm023Cpu  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.cuda import VllmCuda  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.vllm032 import Vllm032  # noqa: E402

LINE = platforms.vllm_line()
HERE = [p for p in PATCHES if LINE in p.vllm and ASCEND not in p.platforms]
PACKAGE = Path(expertweave_ascend.__file__).parent
VLLM_PACKAGES = ("vllm", "vllm_ascend")


def assigned_by_instances(cls: type, name: str) -> bool:
    """Whether the class (or a base) sets `self.<name>` in its source: an attribute its objects carry."""
    pattern = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=[^=]")
    for base in cls.__mro__[:-1]:
        try:
            if pattern.search(inspect.getsource(base)):
                return True
        except (OSError, TypeError):
            continue
    return False


def test_the_table_is_well_formed():
    assert len({p.target for p in PATCHES}) == len(PATCHES), "a target listed twice"
    names = {VllmCpu.name, VllmCuda.name, Vllm023Cpu.name, VllmAscend.name, FRONT_END}
    for patch in PATCHES:
        assert patch.why and patch.scope in (PROCESS, OBJECT), patch
        assert set(patch.vllm) <= {"0.32", "0.23"} and patch.vllm, patch
        assert set(patch.platforms) <= names and patch.platforms, patch
    assert HERE, f"no row for vLLM {LINE}"


@pytest.mark.parametrize("patch", HERE, ids=lambda p: p.target)
def test_each_target_resolves_in_this_vllm(patch):
    if patch.scope == PROCESS:
        assert callable(lookup(patch.target)), f"vLLM {LINE}: {patch.target} is not callable"
        return
    cls = lookup(patch.owner)
    assert isinstance(cls, type), patch.owner
    assert hasattr(cls, patch.attribute) or assigned_by_instances(cls, patch.attribute), \
        f"vLLM {LINE}: {cls.__name__} objects carry no {patch.attribute}"


def test_the_front_end_rows_name_the_module_vllms_api_server_builds_its_app_in():
    from expertweave_ascend.integrations.vllm.server import api_server_module

    module = api_server_module().__name__
    rows = {p.attribute for p in HERE if FRONT_END in p.platforms and p.scope == PROCESS}
    assert rows == {"build_app", "init_app_state"}
    assert {p.owner for p in HERE if p.attribute in rows} == {module}


def platform_targets(cls) -> set[str]:
    """Every target a platform class wraps, from its own constants and the methods that use them."""
    targets = {f"{cls.MODEL_RUNNER}.{getattr(cls, name)}" for name in ("LOAD_MODEL", "EXECUTE_MODEL", "PREPARE_INPUTS")}
    if cls.MODEL_RUNNER_V2 is not None:
        targets.add(f"{cls.MODEL_RUNNER_V2}.{cls.LOAD_MODEL}")
    if cls.reroute_topk is Vllm032.reroute_topk:
        targets.add(cls.ROUTER_SELECT)
    if cls.serve_shared_experts is Vllm032.serve_shared_experts and cls.shared_experts_refusal is None:
        targets.add(cls.SHARED_MLP_FORWARD)
    targets |= {getattr(cls, name) for name in ("KERNEL_FORWARD", "MOE_APPLY", "SELECT_EXPERTS") if hasattr(cls, name)}
    return targets


@pytest.mark.parametrize("cls", (VllmCpu, VllmCuda, Vllm023Cpu, VllmAscend), ids=lambda c: c.__name__)
def test_each_platform_wraps_exactly_its_rows(cls):
    rows = {p.target for p in PATCHES if cls.name in p.platforms}
    assert platform_targets(cls) == rows
    assert all(cls.VLLM_LINE in p.vllm for p in PATCHES if cls.name in p.platforms)


def test_platform_objects_hold_no_state():
    """One platform object serves every engine in the process (platforms.current() is cached)."""
    for cls in (VllmCpu, VllmCuda, Vllm023Cpu, VllmAscend):
        assert vars(cls()) == {}, cls.__name__


def test_a_target_outside_the_table_is_refused():
    from vllm.v1.engine.output_processor import OutputProcessor

    step = OutputProcessor.abort_requests
    with pytest.raises(ExpertWeaveError, match="OutputProcessor.abort_requests is not in patching.PATCHES"):
        replace_method("vllm.v1.engine.output_processor:OutputProcessor.abort_requests", lambda f: f)
    assert OutputProcessor.abort_requests is step
    target = "vllm.v1.engine.output_processor:OutputProcessor.add_request"
    with pytest.raises(ExpertWeaveError, match="listed in patching.PATCHES with scope 'object', not 'process'"):
        replace_method(target, lambda f: f)
    with pytest.raises(ExpertWeaveError, match="lists this patch for OutputProcessor objects, not object"):
        replace_attribute(object(), target, lambda f: f)


def test_an_object_is_patched_once_and_only_that_object():
    from vllm.v1.engine.output_processor import OutputProcessor

    target = "vllm.v1.engine.output_processor:OutputProcessor.add_request"
    one, other = OutputProcessor.__new__(OutputProcessor), OutputProcessor.__new__(OutputProcessor)
    calls = []

    def counting(original):
        def add_request(*args, **kwargs):
            calls.append(args)
        return add_request

    replace_attribute(one, target, counting)
    replace_attribute(one, target, counting)
    one.add_request("request")
    assert calls == [("request",)] and one.add_request.__wrapped__.__func__ is OutputProcessor.add_request
    assert "add_request" not in vars(other) and OutputProcessor.add_request is lookup(target)


# -- what an engine carries -------------------------------------------------------------------------------
def ours(value) -> bool:
    """A function of ExpertWeave's (or a bound method or partial of one)."""
    if isinstance(value, partial):
        value = value.func
    if inspect.ismethod(value):
        value = value.__func__
    return inspect.isfunction(value) and (getattr(value, "_expertweave", False)
                                          or Path(value.__code__.co_filename).is_relative_to(PACKAGE))


def tracked_objects() -> list:
    """Every object the garbage collector tracks, those vLLM froze after starting its engine included."""
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    try:
        return gc.get_objects()
    finally:
        if frozen:
            gc.freeze()


def replacements() -> tuple[set[tuple[object, str]], set[tuple[object, str]]]:
    """ExpertWeave's functions held by vLLM: (module or class, attribute) and (object, attribute)."""
    owned, objects = set(), set()
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in VLLM_PACKAGES:
            continue
        for attribute, value in list(vars(module).items()):
            if ours(value):
                owned.add((module, attribute))
            if isinstance(value, type) and value.__module__ == name:
                owned |= {(value, a) for a, v in list(vars(value).items()) if ours(v)}
    for obj in tracked_objects():
        kind = type(obj)  # not isinstance: a weak proxy to a dead object raises on every other look
        if issubclass(kind, type) or not isinstance(kind.__module__, str) or \
                kind.__module__.split(".")[0] not in VLLM_PACKAGES:
            continue
        try:
            own = object.__getattribute__(obj, "__dict__")
        except (AttributeError, TypeError):
            continue
        if isinstance(own, dict):
            objects |= {(obj, a) for a, v in list(own.items()) if ours(v)}
    return owned, objects


def unlisted(owned, objects) -> list[str]:
    process = {resolve(p.target) for p in PATCHES if p.scope == PROCESS and LINE in p.vllm
               and ASCEND not in p.platforms}
    found = [f"{getattr(o, '__qualname__', getattr(o, '__name__', o))}.{a}" for o, a in owned if (o, a) not in process]
    per_object = [(lookup(p.owner), p.attribute) for p in HERE if p.scope == OBJECT]
    found += [f"{type(o).__qualname__} object's {a}" for o, a in objects
              if not any(isinstance(o, cls) and a == attribute for cls, attribute in per_object)]
    return found


@pytest.fixture(scope="module")
def served(tiny):
    """An in-process ExpertWeave engine serving adapters and tuned shared experts, after a step."""
    import os

    from vllm import SamplingParams

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    llm = ExpertWeaveLLM(str(tiny / "base"), {"law": str(tiny / "adapters" / "law")}, max_adapters=2,
                         enforce_eager=True, shared_experts=True, max_model_len=256, kv_cache_memory_bytes=32 << 20)
    try:
        llm.generate(["the court held that"], SamplingParams(max_tokens=2), adapter="law", use_tqdm=False)
        yield llm
    finally:
        llm.shutdown()


def test_an_engine_carries_only_replacements_the_table_lists(served):
    owned, objects = replacements()
    assert not unlisted(owned, objects)
    made = {patch.target for patch in HERE if patch.scope == PROCESS and resolve(patch.target) in owned}
    runner = type(platforms.current()).MODEL_RUNNER
    assert {f"{runner}.load_model", f"{runner}.execute_model", f"{runner}._prepare_inputs"} <= made
    kinds = {(type(o).__name__, a) for o, a in objects}
    assert ("DeepseekV2MLP", "forward") in kinds, "the shared experts' MLPs carry their replacement"
    assert ("OutputProcessor", "add_request") in kinds, "the engine client's registration is checked"


def test_a_replacement_made_around_the_table_is_found(served):
    from vllm.v1.engine.output_processor import OutputProcessor

    original = OutputProcessor.abort_requests
    patching._replace(OutputProcessor, "abort_requests", lambda f: lambda *a, **k: f(*a, **k))
    try:
        assert unlisted(*replacements()) == ["OutputProcessor.abort_requests"]
    finally:
        OutputProcessor.abort_requests = original
