"""The Atlas install resolves: pip's resolver, as a dry run on package metadata (nothing is installed), over
what the README's Atlas section installs, for an Atlas A2 server's host (Kunpeng, aarch64; CPython 3.11;
x86 hosts take torch from PyTorch's CPU index, which this machine cannot reach).

The set, as vllm-ascend 0.23.0.post1 documents its install: torch and torch-npu (requirements-ascend.txt),
vLLM 0.23.0 built from source for an empty target device (its requirements/common.txt: no torch pin, which
the PyPI wheel's torch==2.11.0 would break), vllm-ascend 0.23.0.post1 (a source release that needs CANN to
build: its PKG-INFO's requirements), and this project's own requirements (setup.py). A requirement on a
release PyPI serves only as source (arctic-inference) is replaced by its PKG-INFO's requirements too.
triton-ascend==3.2.2 comes from Ascend's own index, which this machine cannot reach: it is left out of the
resolve, and the README's install command must name that index.

pip's resolves fetch metadata from PyPI for minutes: they are marked long (`make test-long`).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import pinned

ROOT = Path(__file__).resolve().parents[1]
ASCEND_INDEX = "https://mirrors.huaweicloud.com/ascend/repos/pypi"
ASCEND_INDEX_ONLY = ("triton-ascend",)
# glibc 2.35 (Ubuntu 22.04, vllm-ascend's CANN image): wheels for any older manylinux install there; pip takes
# each platform tag as given, older ones included only when named.
ATLAS_HOST = [*(f"--platform=manylinux_2_{minor}_aarch64" for minor in range(17, 36)),
              "--platform=manylinux2014_aarch64", "--python-version", "3.11", "--only-binary=:all:"]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements-ascend.txt").read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name:
            found[name] = version
    return found


def own_requirements() -> list[str]:
    """setup.py's install_requires, read from its source."""
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))


def base_requirements(lines) -> list[Requirement]:
    """The requirements among lines that hold without extras, comments dropped."""
    found = []
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "", "python_version": "3.11",
                                                                      "platform_machine": "aarch64"}):
            requirement.marker = None
            found.append(requirement)
    return found


def source_release_requirements(project: str, version: str) -> list[Requirement]:
    info = pinned.sdist_text(project, version, "PKG-INFO").split("\n\n")[0]
    return base_requirements(line.removeprefix("Requires-Dist: ") for line in info.splitlines()
                             if line.startswith("Requires-Dist: "))


def expand(requirements: list[Requirement]) -> list[str]:
    """Pinned releases PyPI serves as source only stand for their own requirements; Ascend's index is left out."""
    out = []
    for requirement in requirements:
        if requirement.name in ASCEND_INDEX_ONLY:
            continue
        version = next((s.version for s in requirement.specifier if s.operator == "=="), None)
        if version is not None and not pinned.wheels_of(requirement.name, version):
            out += expand(source_release_requirements(requirement.name, version))
        else:
            out.append(str(requirement))
    return out


def atlas_requirements() -> list[str]:
    found = pins()
    vllm = base_requirements(pinned.sdist_text("vllm", found["vllm"], "requirements/common.txt").splitlines())
    ascend = source_release_requirements("vllm-ascend", found["vllm-ascend"])
    others = [Requirement(f"{name}=={version}") for name, version in found.items()
              if name not in ("vllm", "vllm-ascend")]
    return expand(others + vllm + ascend + base_requirements(own_requirements()))


def resolve(requirements: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    listed = tmp_path / "atlas-requirements.txt"
    listed.write_text("\n".join(requirements) + "\n")
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--target", str(tmp_path / "target"), *ATLAS_HOST, "--report", str(tmp_path / "report.json"),
                           "-r", str(listed)], capture_output=True, text=True, timeout=900)


@pytest.mark.long
def test_the_atlas_set_resolves_for_an_atlas_host(tmp_path):
    requirements = atlas_requirements()
    assert any(r.startswith("transformers") for r in requirements) and "torch==2.10.0" in requirements
    result = resolve(requirements, tmp_path)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)
    chosen = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
              for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert chosen["torch"] == "2.10.0" and chosen["torch-npu"] == "2.10.0.post4"
    assert chosen["transformers"] == "5.5.4" and int(chosen["fastapi"].split(".")[1]) < 124


def test_the_readme_installs_the_pinned_releases_in_vllm_ascends_order():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Ascend NPU"):readme.index("## CUDA GPU")]
    steps = [section.index(text) for text in (
        f"torch=={pins()['torch']}", f"torch-npu=={pins()['torch-npu']}",
        f"--branch v{pins()['vllm']}", "VLLM_TARGET_DEVICE=empty pip install",
        f"--branch v{pins()['vllm-ascend']}", ASCEND_INDEX, "pip install -e '.[test]'")]
    assert steps == sorted(steps)


@pytest.mark.long
def test_the_pin_setup_py_had_before_is_a_conflict(tmp_path):
    """The check can fail: setup.py's transformers requirement before vllm-ascend's pin was admitted."""
    result = resolve([*atlas_requirements(), "transformers>=5.16.1,<5.20"], tmp_path)
    assert result.returncode != 0 and "ResolutionImpossible" in result.stderr
