#!/usr/bin/env bash
# Validate ExpertWeave on a fresh Atlas server, end to end.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/atlas_common.sh
source "$here/atlas_common.sh"

usage() {
    cat <<'EOF'
Usage: scripts/validate_atlas.sh [options]

Validates ExpertWeave on an Atlas server, from a fresh checkout, in five steps, stopping at the
first that fails (each step's log is OUT/<step>.log):
  1 install  in vllm-ascend 0.23.0.post1's documented order (README, Ascend NPU): torch 2.10 and
             torch-npu 2.10.0.post4, vLLM 0.23.0 from source for an empty target device, vllm-ascend
             0.23.0.post1 from source (with Ascend's index), then this project with its test extra
  2 build    the Ascend C kernels (ascendc_kernels/README.md): cmake -S ascendc_kernels
             -B build/ascendc_kernels -DSOC_VERSION=SOC, cmake --build; the library must land
             where the kernel loader looks
  3 test     the NPU tests (pytest -m npu: the kernels; the loader's threads binding the NPU before they
             map; synchronize draining torch_npu's task queue; serve_atlas.sh serving contrastive
             decoding and a non-expert adapter under the README's flags and refusing them, naming the
             flags, without), the vllm-ascend hook checks (tests/test_vllm_ascend_hooks.py) and the
             front-end's (tests/test_frontend.py: the API server imports no NPU model runner)
  4 verify   expertweave verify --engine vllm: the base and every adapter in one engine, each row
             against the merged model served by plain vLLM (report: OUT/verify.json)
  5 bench    scripts/reroute_share.py: reroute's share of one MoE layer's time (OUT/reroute_share.json)

Options:
  --soc VERSION        CANN SOC_VERSION, e.g. ascend910b1 (default: torch_npu's name for NPU 0,
                       lower-cased, e.g. Ascend910B1 -> ascend910b1)
  --base DIR           base checkpoint for step 4 (default: the embedded tiny model, which
                       `expertweave make-tiny` writes to OUT/tiny with 3 adapters)
  --adapter NAME=PATH  adapter for step 4 (repeatable; needs --base)
  --adapters-dir DIR   every subdirectory an adapter, for step 4 (needs --base)
  --dtype DTYPE        step 4's dtype: bfloat16 (default), float16 or float32
  --max-new-tokens N   tokens step 4 generates per row (default 16)
  --device N           the NPU steps 3-5 use (ASCEND_RT_VISIBLE_DEVICES, default 0)
  --python PYTHON      interpreter to install into and run with (default: python3)
  --skip-install       skip step 1 (use the environment as it is)
  --out DIR            (default: validate-atlas-YYYYmmdd-HHMMSS)
  -h, --help           this text

Environment: ASCEND_TOOLKIT_HOME (default /usr/local/Ascend/ascend-toolkit), as in serve_atlas.sh.
Run it from anywhere; it works in the checkout that holds it.
EOF
}

soc="" base="" dtype=bfloat16 max_new_tokens=16 device=0 python=python3 install=1 out=""
adapters=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --soc) need_value "$@"; soc=$2; shift 2 ;;
        --base) need_value "$@"; base=$2; shift 2 ;;
        --adapter | --adapters-dir) need_value "$@"; adapters+=("$1" "$2"); shift 2 ;;
        --dtype) need_value "$@"; dtype=$2; shift 2 ;;
        --max-new-tokens) need_value "$@"; max_new_tokens=$2; shift 2 ;;
        --device) need_value "$@"; device=$2; shift 2 ;;
        --python) need_value "$@"; python=$2; shift 2 ;;
        --skip-install) install=0; shift ;;
        --out) need_value "$@"; out=$2; shift 2 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) die "unexpected argument '$1' (see --help)" ;;
    esac
done
[[ $dtype =~ ^(bfloat16|float16|float32)$ ]] || die "--dtype is bfloat16, float16 or float32, not '$dtype'"
[[ $device =~ ^[0-9]+$ ]] || die "--device must be an NPU index, not '$device'"
positive_int --max-new-tokens "$max_new_tokens"
if [[ -z $base && ${#adapters[@]} -gt 0 ]]; then
    die "--adapter and --adapters-dir need --base (the default tiny model brings its own adapters)"
fi
[[ -z $base || -d $base ]] || die "$base: not a directory"
command -v "$python" >/dev/null || die "no '$python' interpreter"

root=$(cd "$here/.." && pwd)
out=${out:-validate-atlas-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"

# step NAME COMMAND...: runs COMMAND with its output in OUT/NAME.log, and stops everything if it fails.
step() {
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" >"$out/$name.log" 2>&1; then
        tail -n 30 "$out/$name.log" >&2
        die "step '$name' failed; full log: $out/$name.log"
    fi
}

cann_env
# pin NAME: its version in requirements-ascend.txt
pin() {
    sed -n "s/^$1==\([^ #]*\).*/\1/p" requirements-ascend.txt
}
install_torch() {
    local extra=()
    # torch_npu's x86 wheels want torch's CPU build, which PyTorch's own index serves
    [[ $(uname -m) != x86_64 ]] || extra=(--extra-index-url https://download.pytorch.org/whl/cpu/)
    "$python" -m pip install "${extra[@]}" "torch==$(pin torch)" "torch-npu==$(pin torch-npu)"
}
install_vllm() {
    rm -rf "$out/src/vllm"
    git clone --depth 1 --branch "v$(pin vllm)" https://github.com/vllm-project/vllm "$out/src/vllm"
    (cd "$out/src/vllm" && VLLM_TARGET_DEVICE=empty "$python" -m pip install -e .)
}
install_vllm_ascend() {
    rm -rf "$out/src/vllm-ascend"
    git clone --depth 1 --branch "v$(pin vllm-ascend)" https://github.com/vllm-project/vllm-ascend "$out/src/vllm-ascend"
    (cd "$out/src/vllm-ascend" && git submodule update --init --recursive &&
        "$python" -m pip install -e . --extra-index-url https://mirrors.huaweicloud.com/ascend/repos/pypi)
}
if ((install)); then
    step install-torch install_torch
    step install-vllm install_vllm
    step install-vllm-ascend install_vllm_ascend
    step install-project "$python" -m pip install -e ".[test]"
fi
export ASCEND_RT_VISIBLE_DEVICES=$device
if [[ -z $soc ]]; then
    soc=$("$python" -c 'import torch_npu; print(torch_npu.npu.get_device_name(0).lower())') \
        || die "cannot read the NPU's name through torch_npu; give --soc"
fi
echo "SOC_VERSION $soc, NPU $device, output $out"

kernels=$("$python" -c 'from expertweave_ascend.integrations.ascend.kernels import library_path; print(library_path())')
step build-configure cmake -S ascendc_kernels -B build/ascendc_kernels -DSOC_VERSION="$soc" \
    -DPython3_EXECUTABLE="$(command -v "$python")"
step build cmake --build build/ascendc_kernels -j
[[ -f $kernels ]] || die "the build did not produce $kernels, where the kernel loader looks"

# pytest -m npu exits 5 when it collects nothing: no NPU test at all is a failure here too.
step test-npu "$python" -m pytest -q -m npu tests
step test-hooks "$python" -m pytest -q tests/test_vllm_ascend_hooks.py tests/test_frontend.py

if [[ -z $base ]]; then
    step make-tiny "$python" -m expertweave_ascend.cli make-tiny "$out/tiny"
    base=$out/tiny/base
    adapters=(--adapters-dir "$out/tiny/adapters")
fi
((${#adapters[@]})) || die "give adapters to verify: --adapter NAME=PATH or --adapters-dir DIR"
verify() {
    "$python" -m expertweave_ascend.cli verify --engine vllm --base "$base" "${adapters[@]}" --dtype "$dtype" \
        --max-new-tokens "$max_new_tokens" --json >"$out/verify.json"
}
step verify verify
"$python" - "$out/verify.json" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
rows = [("base", report["base"]), *report["adapters"].items()]
for name, row in rows:
    print(f"  {name:>16}: tokens equal {row['tokens_equal']}, max |{report['compared']} diff| {row['max_abs_diff']:.3g}")
memory = report["memory"]
print(f"  adapter experts {memory['adapter_expert_bytes'] / 2**20:.1f} MiB, mapped "
      f"{memory['adapter_mapped_bytes'] / 2**20:.1f} MiB (granule {memory['granularity'] >> 20} MiB)")
PY

bench() {
    "$python" scripts/reroute_share.py --json >"$out/reroute_share.json"
}
step bench bench
"$python" - "$out/reroute_share.json" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
print(f"  {report['device']}: reroute's share of one MoE layer ({report['slots']} slots, top-{report['top_k']})")
for row in report["rows"]:
    print(f"  {row['tokens']:>6} tokens: MoE layer {row['moe_layer_us']:9.1f} us, reroute {row['reroute_us']:7.1f} us, "
          f"share {row['share']:.2%}")
PY
echo "ExpertWeave validated on $soc; logs and reports in $out"
