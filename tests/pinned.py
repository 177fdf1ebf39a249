"""Files of pinned releases, fetched once from PyPI and cached: the Ascend ones (requirements-ascend.txt)
and the CUDA driver header.

Nothing here is installed: torch_npu's wheel gives the real AscendCL headers, vllm-ascend's source
release gives the code the NPU platform hooks (vLLM 0.23 itself, which runs here, is executed by
tests/vllm023 instead), nvidia-cuda-runtime's wheel gives cuda.h. Downloads use PyPI's
simple index (PEP 691) and are checked against the sha256 it publishes.

Tests only read the cache (.pinned, or $EXPERTWEAVE_PINNED_CACHE): `make pinned` (which `make test-main`
runs first) fills it by running this file, which fetches everything the tests read, the files of each
project tests/test_atlas_install.py expands included. A test that reads something absent fails saying so.
"""

import hashlib
import json
import os
import tarfile
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EXPERTWEAVE_PINNED_CACHE", ROOT / ".pinned"))
INDEX = "https://pypi.org/simple"
# cuda.h of CUDA 13.5, the release the pinned cuda-bindings (constraints.txt) was generated from.
CUDA_RUNTIME = "13.5.37"


def pin(project: str) -> str:
    for line in (ROOT / "requirements-ascend.txt").read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name == project:
            return version
    raise KeyError(f"requirements-ascend.txt: no pin for {project}")


# Set by fetch_all (`make pinned`): only then may anything be downloaded.
_online = False


def _absent(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is not in the pinned-release cache: `make pinned` fetches it")


def _index_files(project: str) -> dict[str, dict]:
    """PyPI's files of a project (every release), by file name, with their URLs and hashes; the listing is
    kept in the cache with the files."""
    listing = CACHE / "index" / f"{project}.json"
    if not listing.exists():
        if not _online:
            raise _absent(listing)
        request = urllib.request.Request(f"{INDEX}/{project}/",
                                         headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = {f["filename"]: f for f in json.load(response)["files"]}
        listing.parent.mkdir(parents=True, exist_ok=True)
        partial = listing.with_suffix(".part")
        partial.write_text(json.dumps(files))
        partial.rename(listing)
    return json.loads(listing.read_text())


def _fetch(project: str, filename: str) -> Path:
    target = CACHE / filename
    if target.exists():
        return target
    if not _online:
        raise _absent(target)
    files = _index_files(project)
    if filename not in files:
        raise FileNotFoundError(f"PyPI {project}: no file {filename}")
    entry = files[filename]
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    with urllib.request.urlopen(entry["url"], timeout=600) as response, open(partial, "wb") as out:
        digest = hashlib.sha256()
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != entry["hashes"]["sha256"]:
        partial.unlink()
        raise ValueError(f"{filename}: sha256 differs from PyPI's")
    partial.rename(target)
    return target


def torch_npu_wheel() -> Path:
    """The pinned torch_npu wheel for CPython 3.11 on x86-64."""
    return _fetch("torch-npu", f"torch_npu-{pin('torch-npu')}-cp311-cp311-manylinux_2_28_x86_64.whl")


def acl_include_dir() -> Path:
    """torch_npu's copy of the AscendCL headers (acl/acl_rt.h and what it includes)."""
    version = pin("torch-npu")
    out = CACHE / f"torch_npu-{version}-acl-inc"
    if not (out / "acl" / "acl_rt.h").exists():
        wheel = torch_npu_wheel()
        prefix = "torch_npu/include/third_party/acl/inc/"
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    path = out / name[len(prefix):]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(archive.read(name))
    return out


def _sdist_tree(project: str, top: str, keep) -> Path:
    """The pinned source release of project, unpacked once without its top directory, keeping the
    files keep(path inside it) accepts; top is a directory whose presence says it is unpacked."""
    version = pin(project)
    out = CACHE / f"{project.replace('-', '_')}-{version}"
    if not (out / top).is_dir():
        sdist = _fetch(project, f"{project.replace('-', '_')}-{version}.tar.gz")
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and keep(m.name.split("/", 1)[-1])]
            for member in members:
                member.name = member.name.split("/", 1)[1]
            archive.extractall(out, members=members, filter="data")
    return out


def wheels_of(project: str, version: str) -> list[str]:
    """The wheels PyPI serves for a release (empty: a source release only)."""
    prefix = f"{project.replace('-', '_').lower()}-{version}-"
    return [f for f in _index_files(project) if f.lower().startswith(prefix) and f.endswith(".whl")]


def sdist_text(project: str, version: str, member: str) -> str:
    """A file of a source release from PyPI, by its path under the release's top directory."""
    sdist = _fetch(project, f"{project.replace('-', '_')}-{version}.tar.gz")
    with tarfile.open(sdist) as archive:
        top = archive.getmembers()[0].name.split("/")[0]
        return archive.extractfile(f"{top}/{member}").read().decode()


def vllm_ascend_sources() -> Path:
    """The pinned source release's root: its vllm_ascend package and its csrc."""
    return _sdist_tree("vllm-ascend", "vllm_ascend", lambda path: path.split("/")[0] in ("vllm_ascend", "csrc"))


def cuda_include_dir() -> Path:
    """The CUDA driver header cuda.h, from the pinned nvidia-cuda-runtime wheel."""
    out = CACHE / f"nvidia_cuda_runtime-{CUDA_RUNTIME}-include"
    if not (out / "cuda.h").exists():
        wheel = _fetch("nvidia-cuda-runtime",
                       f"nvidia_cuda_runtime-{CUDA_RUNTIME}-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
        with zipfile.ZipFile(wheel) as archive:
            out.mkdir(parents=True, exist_ok=True)
            (out / "cuda.h").write_bytes(archive.read("nvidia/cu13/include/cuda.h"))
    return out


def fetch_all() -> None:
    """Fetches into the cache every file the tests read: the wheels, headers and source tree above, and
    what tests/test_atlas_install.py's expansion of the Atlas set reads (index listings and sdists)."""
    global _online
    _online = True
    acl_include_dir()
    vllm_ascend_sources()
    cuda_include_dir()
    from test_atlas_install import atlas_requirements

    atlas_requirements()


if __name__ == "__main__":
    # Run as a script (tests/ first on sys.path) this file is __main__, and test_atlas_install imports it
    # again as `pinned`: that module is the one whose downloads must be allowed.
    import pinned

    pinned.fetch_all()
    print(f"pinned releases cached in {pinned.CACHE}")
