#!/usr/bin/env bash
# A profiled serving run of ExpertWeave on an Atlas server, for MindStudio Insight.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/atlas_common.sh
source "$here/atlas_common.sh"

usage() {
    cat <<'EOF'
Usage: scripts/profile_msprof.sh [options] BASE [-- VLLM_SERVE_ARGS...]

Serves BASE and its adapters with scripts/serve_atlas.sh, sends REQUESTS completions spread round
robin over every model the server lists (the base and each adapter, so batches mix them), and
profiles them:
  --mode torch   (default) the torch_npu profiler through vLLM's --profiler-config, started and
                 stopped over HTTP (/start_profile, /stop_profile) around the requests, then
                 analysed with torch_npu.profiler.profiler.analyse. Output:
                 OUT/torch/*_ascend_pt/ASCEND_PROFILER_OUTPUT/ (trace_view.json, kernel_details.csv,
                 op_statistic.csv, analysis.db)
  --mode msprof  the whole serving run under CANN's msprof --application (start-up included).
                 Output: OUT/msprof/PROF_*/ (mindstudio_profiler_output/ after msprof's export)
Open OUT/torch/<...>_ascend_pt or OUT/msprof/PROF_<...> in MindStudio Insight (Timeline, Operator).

Where rerouting shows up (one per MoE layer per forward step):
  host rows (PyTorch ops)  expertweave::reroute_layer, and inside it expertweave::reroute; in the
                           torch mode they sit inside vllm-ascend's MoE forward, right after the
                           top-k gating op and before the init-routing op
  device rows (kernels)    reroute_kernel (ascendc_kernels/reroute.cpp), an AIV vector kernel,
                           between the gating kernel (MoeGatingTopK...) and the init-routing kernel
                           (MoeInitRouting...), ahead of the two GroupedMatmul kernels of the layer
  Its share of the layer: compare reroute_kernel with the layer's GroupedMatmul kernels in
  op_statistic.csv / kernel_details.csv; scripts/reroute_share.py measures it in isolation.

Options:
  --adapter NAME=PATH   serve the ESFT adapter at PATH as model NAME (repeatable)
  --adapters-dir DIR    serve every subdirectory of DIR as an adapter
  --tp N, --dp N        tensor / data parallel size (default 1 / 1; --dp above 1 is refused)
  --devices LIST        NPUs, as ASCEND_RT_VISIBLE_DEVICES (default: the first TP x DP)
  --port PORT           (default 8000)
  --mode torch|msprof   (default torch)
  --requests N          completions to send (default 32)
  --max-tokens N        tokens each completion generates (default 64)
  --out DIR             (default: expertweave-profile-YYYYmmdd-HHMMSS)
  --timeout SECONDS     how long to wait for /health (default 1800)
  -h, --help            this text
Arguments after -- go to vLLM's server unchanged. The environment is serve_atlas.sh's.
EOF
}

base="" mode=torch requests=32 max_tokens=64 out="" port=8000 timeout=1800
serve_args=()
vllm_args=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --adapter | --adapters-dir | --tp | --dp | --devices)
            need_value "$@"; serve_args+=("$1" "$2"); shift 2 ;;
        --port) need_value "$@"; port=$2; shift 2 ;;
        --mode) need_value "$@"; mode=$2; shift 2 ;;
        --requests) need_value "$@"; requests=$2; shift 2 ;;
        --max-tokens) need_value "$@"; max_tokens=$2; shift 2 ;;
        --out) need_value "$@"; out=$2; shift 2 ;;
        --timeout) need_value "$@"; timeout=$2; shift 2 ;;
        --) shift; vllm_args=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $base ]] || die "one BASE only (got '$base' and '$1')"; base=$1; shift ;;
    esac
done
[[ -n $base ]] || die "give the BASE checkpoint directory (see --help)"
[[ $mode == torch || $mode == msprof ]] || die "--mode is torch or msprof, not '$mode'"
positive_int --requests "$requests"
positive_int --max-tokens "$max_tokens"
positive_int --port "$port"
positive_int --timeout "$timeout"
out=${out:-expertweave-profile-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
url="http://127.0.0.1:$port"
python=${PYTHON:-python3}
cann_env

# send_requests: REQUESTS completions, round robin over the served models, all in flight at once.
send_requests() {
    local models i model body pids=()
    mapfile -t models < <(curl -fsS "$url/v1/models" | "$python" -c \
        'import json, sys; print("\n".join(m["id"] for m in json.load(sys.stdin)["data"]))')
    ((${#models[@]})) || die "the server lists no models"
    echo "sending $requests completions over: ${models[*]}"
    for ((i = 0; i < requests; i++)); do
        model=${models[i % ${#models[@]}]}
        body=$("$python" -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "max_tokens": int(sys.argv[2]),
              "temperature": 0, "prompt": f"Question {sys.argv[3]}: how does a contract differ from a tort?"}))' \
            "$model" "$max_tokens" "$i")
        curl -fsS -o /dev/null -H 'Content-Type: application/json' -d "$body" "$url/v1/completions" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do
        wait "$i" || die "a completion request failed; see the server log in $out"
    done
}

serve=("$here/serve_atlas.sh" "$base" --port "$port" --timeout "$timeout" "${serve_args[@]}")
pid_file="$out/server.pid"

if [[ $mode == torch ]]; then
    profiler_config="{\"profiler\": \"torch\", \"torch_profiler_dir\": \"$out/torch\","
    profiler_config+=" \"torch_profiler_with_stack\": false}"
    "${serve[@]}" --detach --pid-file "$pid_file" --log "$out/server.log" \
        -- --profiler-config "$profiler_config" "${vllm_args[@]}"
    trap 'stop_server "$(cat "$pid_file")"' EXIT
    curl -fsS -X POST "$url/start_profile" >/dev/null
    send_requests
    curl -fsS -X POST "$url/stop_profile" >/dev/null
    stop_server "$(cat "$pid_file")"
    trap - EXIT
    shopt -s nullglob
    traces=("$out"/torch/*_ascend_pt)
    ((${#traces[@]})) || die "no *_ascend_pt directory under $out/torch; see $out/server.log"
    for trace in "${traces[@]}"; do
        [[ -d $trace/ASCEND_PROFILER_OUTPUT ]] || "$python" - "$trace" <<'PY'
import sys

import torch_npu.profiler.profiler

torch_npu.profiler.profiler.analyse(sys.argv[1])
PY
        echo "profile: $trace/ASCEND_PROFILER_OUTPUT"
    done
else
    command -v msprof >/dev/null || die "no msprof on PATH: source the CANN toolkit's set_env.sh first"
    mkdir -p "$out/msprof"
    application=$(printf '%q ' "${serve[@]}" --pid-file "$pid_file" --log "$out/server.log" -- "${vllm_args[@]}")
    msprof --output="$out/msprof" --task-time=on --ai-core=on --runtime-api=on --application="$application" \
        >"$out/msprof.log" 2>&1 &
    msprof_pid=$!
    trap 'kill "$msprof_pid" 2>/dev/null || true' EXIT
    until [[ -s $pid_file ]]; do  # serve_atlas.sh writes it once the server answers /health
        kill -0 "$msprof_pid" 2>/dev/null || die "the server did not start under msprof; see $out/msprof.log"
        sleep 5
    done
    send_requests
    stop_server "$(cat "$pid_file")"
    wait "$msprof_pid" || die "msprof failed; see $out/msprof.log"
    trap - EXIT
    echo "profile: $out/msprof (msprof's log: $out/msprof.log)"
fi
echo "open it in MindStudio Insight; rerouting: expertweave::reroute_layer / expertweave::reroute (host),"
echo "reroute_kernel (device), see --help"
