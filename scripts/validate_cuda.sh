#!/usr/bin/env bash
# Validate ExpertWeave's CUDA backend on a machine with an NVIDIA GPU.
set -euo pipefail

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

usage() {
    cat <<'USAGE'
Usage: scripts/validate_cuda.sh [options]

Runs, in the checkout that holds this script, with the interpreter's own torch (a CUDA build),
Triton and cuda-bindings, and without installing anything (PYTHONPATH is the checkout):
  1 test   the CUDA tests natively: CudaBackend through the whole memory suite on the GPU
           (tests/test_cuda_backend.py), the Triton reroute kernel against the torch reference
           (tests/test_reroute_triton.py), the routing tables and the memory layer, and the tiny
           model's base and adapters in one batch on the GPU against the merged models
           (transformers, tests/test_verify.py)
  2 bench  python -m perf.gpu: the Triton reroute kernel vs torch and its share of one
           DeepSeek-V2-Lite MoE layer at 1..256 tokens, and the real ESFT selections loaded on CUDA
           virtual memory; writes OUT/<date>-<gpu>.json and .md

Options:
  --esft-data DIR  the real ESFT data (expert_configs/, expert_scores/) for step 2 (default:
                   ../shared/data/esft beside the checkout)
  --quick          step 2 at 1, 16 and 256 tokens only
  --python PYTHON  interpreter (default: python3)
  --out DIR        where step 2 writes (default: perf/results)
  -h, --help       this text
USAGE
}

python=python3 out=perf/results esft_data="" quick=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --esft-data | --python | --out)
            [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
            case $1 in
                --esft-data) esft_data=$2 ;;
                --python) python=$2 ;;
                --out) out=$2 ;;
            esac
            shift 2 ;;
        --quick) quick=(--quick); shift ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) die "unexpected argument '$1' (see --help)" ;;
    esac
done
command -v "$python" >/dev/null || die "no '$python' interpreter"
[[ -z $esft_data || -d $esft_data/expert_configs ]] || die "$esft_data: no expert_configs/ in it"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[[ -z $esft_data ]] || export EXPERTWEAVE_ESFT_DATA=$esft_data
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "$python's torch sees no CUDA GPU"

echo "== test"
"$python" -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py tests/test_reroute_triton.py \
    tests/test_routing.py tests/test_memory.py tests/test_verify.py::test_mixed_batch_equals_merged_models_on_the_gpu
echo "== bench"
"$python" -m perf.gpu "${quick[@]}" --out "$out"
