#!/usr/bin/env bash
# Serve a base model and its ESFT adapters with `expertweave serve` on an Atlas server.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/atlas_common.sh
source "$here/atlas_common.sh"

usage() {
    cat <<'EOF'
Usage: scripts/serve_atlas.sh [options] BASE [-- VLLM_SERVE_ARGS...]

Serves BASE (a DeepSeek-V2-style checkpoint directory) and ESFT adapters as models of one
vLLM + vllm-ascend engine (`expertweave serve`): sets up the CANN environment, the NPUs and HCCL,
starts the server, waits for /health and reports the models it serves. Stays in the foreground
until the server stops (Ctrl-C stops it), unless --detach.

Options:
  --adapter NAME=PATH   serve the ESFT adapter at PATH as model NAME (repeatable)
  --adapters-dir DIR    serve every subdirectory of DIR as an adapter named after it
  --tp N                tensor parallel size (default 1)
  --dp N                data parallel size (default 1; ExpertWeave refuses more than 1 for now)
  --devices LIST        NPUs, as ASCEND_RT_VISIBLE_DEVICES (default: the first TP x DP)
  --host HOST           address to listen on (default 0.0.0.0)
  --port PORT           (default 8000)
  --base-name NAME      the base model's "model" name (default: BASE's directory name)
  --max-adapters N      adapters loaded at once (default: expertweave serve's, 8)
  --adapter-slots N     expert slots per MoE layer for adapters (default: expertweave serve's)
  --allow-runtime-loading
                        add the load and unload routes (guard them with -- --api-key KEY)
  --adapter-root DIR    serve its subdirectories by name, loaded when a request names one;
                        runtime loads read only inside DIR
  --adapter-wait SECONDS
                        how long a request waits for its adapter to load (default: 60)
  --host-adapter-bytes SIZE
                        host tier for evicted adapters, e.g. 8GiB (default: expertweave serve's, 2GiB)
  --eviction-policy P   lru or demand: which idle adapter makes room (default lru)
  --log FILE            server log (default: expertweave-serve-PORT.log)
  --pid-file FILE       once it serves, write the server's process id there
  --timeout SECONDS     how long to wait for /health (default 1800)
  --detach              report and exit, leaving the server running
  -h, --help            this text
Arguments after -- go to vLLM's server unchanged, e.g. -- --max-model-len 4096 --dtype bfloat16.

Environment:
  ASCEND_TOOLKIT_HOME   CANN toolkit (default /usr/local/Ascend/ascend-toolkit); its set_env.sh is
                        sourced, and NNAL's atb/set_env.sh when present (ASCEND_NNAL_HOME)
  HCCL_OP_EXPANSION_MODE, HCCL_CONNECT_TIMEOUT, HCCL_EXEC_TIMEOUT
                        default to AIV, 1200 and 1200 when unset (TP/DP collectives)
  PYTORCH_NPU_ALLOC_CONF, TASK_QUEUE_ENABLE
                        default to expandable_segments:True and 1 when unset
  EXPERTWEAVE           the expertweave command (default: expertweave on PATH)

Expert parallelism (--enable-expert-parallel) is refused: ExpertWeave on vllm-ascend serves TP and
DP; with EP each adapter expert would have to live on the EP rank of its base expert.
EOF
}

# at_most OPTION VALUE MAX: a positive integer VALUE no larger than MAX, compared as digits because bash's
# arithmetic wraps a long number around (and first_devices counts up to TP x DP).
at_most() {
    [[ ${#2} -lt ${#3} || (${#2} -eq ${#3} && ! $2 > $3) ]] || die "$1 must be at most $3, not '$2'"
}

base="" tp=1 dp=1 devices="" host=0.0.0.0 port=8000 log="" pid_file="" timeout=1800 detach=0
serve_args=()
vllm_args=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --adapter | --adapters-dir | --base-name | --max-adapters | --adapter-slots | --adapter-root | \
            --adapter-wait | --host-adapter-bytes | --eviction-policy)
            need_value "$@"; serve_args+=("$1" "$2"); shift 2 ;;
        --allow-runtime-loading) serve_args+=("$1"); shift ;;
        --tp) need_value "$@"; tp=$2; shift 2 ;;
        --dp) need_value "$@"; dp=$2; shift 2 ;;
        --devices) need_value "$@"; devices=$2; shift 2 ;;
        --host) need_value "$@"; host=$2; shift 2 ;;
        --port) need_value "$@"; port=$2; shift 2 ;;
        --log) need_value "$@"; log=$2; shift 2 ;;
        --pid-file) need_value "$@"; pid_file=$2; shift 2 ;;
        --timeout) need_value "$@"; timeout=$2; shift 2 ;;
        --detach) detach=1; shift ;;
        --) shift; vllm_args=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $base ]] || die "one BASE only (got '$base' and '$1')"; base=$1; shift ;;
    esac
done
[[ -n $base ]] || die "give the BASE checkpoint directory (see --help)"
[[ -d $base ]] || die "$base: not a directory"
positive_int --tp "$tp"
positive_int --dp "$dp"
positive_int --port "$port"
positive_int --timeout "$timeout"
at_most --tp "$tp" 1024
[[ $dp == 1 ]] || die "--dp $dp: data parallelism is not supported by ExpertWeave yet (each engine would load adapters on its own): serve one engine per device behind a load balancer, or use --tp"
at_most --port "$port" 65535
at_most --timeout "$timeout" 604800
for arg in "${vllm_args[@]}"; do
    [[ $arg != --enable-expert-parallel* ]] || die "expert parallelism is not supported by ExpertWeave on vllm-ascend"
done
expertweave=${EXPERTWEAVE:-expertweave}
command -v "$expertweave" >/dev/null || die "no '$expertweave' command: install this project (scripts/validate_atlas.sh)"
command -v curl >/dev/null || die "curl is needed to wait for the server"

cann_env
export ASCEND_RT_VISIBLE_DEVICES=${devices:-$(first_devices $((tp * dp)))}
export HCCL_OP_EXPANSION_MODE=${HCCL_OP_EXPANSION_MODE:-AIV}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}

log=${log:-expertweave-serve-$port.log}
url="http://127.0.0.1:$port"
if [[ $host != 127.0.0.1 && $host != 0.0.0.0 && $host != localhost ]]; then
    url="http://$host:$port"
fi
command=("$expertweave" serve "$base" --host "$host" --port "$port" "${serve_args[@]}"
         -- --tensor-parallel-size "$tp" --data-parallel-size "$dp" "${vllm_args[@]}")
echo "NPUs $ASCEND_RT_VISIBLE_DEVICES, TP $tp, DP $dp; log $log"
echo "+ ${command[*]}"
if ((detach)); then
    nohup "${command[@]}" >"$log" 2>&1 &
else
    "${command[@]}" >"$log" 2>&1 &
fi
pid=$!
trap 'stop_server "$pid"' INT TERM EXIT

wait_health "$url" "$timeout" "$pid" "$log"
[[ -z $pid_file ]] || echo "$pid" >"$pid_file"
echo "ExpertWeave is serving at $url (pid $pid); models:"
curl -fsS "$url/v1/models"
echo
echo "ESFT adapters and expert memory:"
curl -fsS "$url/v1/esft_adapters" || die "the server answers but has no /v1/esft_adapters: its front-end did not start (see $log)"
echo
if ((detach)); then
    trap - INT TERM EXIT
    echo "left running; stop it with: kill $pid"
    exit 0
fi
echo "serving until stopped (Ctrl-C)"
status=0
wait "$pid" || status=$?
trap - INT TERM EXIT
stop_server "$pid"
# 130 / 143: stopped by SIGINT / SIGTERM after it served, as asked.
((status == 0 || status == 130 || status == 143)) || die "the server exited with status $status; log: $log"
echo "server stopped"
