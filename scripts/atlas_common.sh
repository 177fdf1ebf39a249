# shellcheck shell=bash
# Shared by the Atlas scripts (sourced, not run): errors, argument checks, the CANN environment and
# waiting for a server. Each function reports through die(), which names the calling script.

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

# need_value OPTION ARGS...: OPTION must be followed by a non-empty value.
need_value() {
    [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
}

positive_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"
}

# The CANN toolkit's environment (and NNAL's ATB, which vllm-ascend uses, when installed).
cann_env() {
    local toolkit="${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}"
    local atb="${ASCEND_NNAL_HOME:-/usr/local/Ascend/nnal}/atb/set_env.sh"
    [[ -f $toolkit/set_env.sh ]] || die "no CANN toolkit at $toolkit (set ASCEND_TOOLKIT_HOME to its directory)"
    # set_env.sh reads variables it may not have set yet.
    set +u
    # shellcheck source=/dev/null
    source "$toolkit/set_env.sh"
    if [[ -f $atb ]]; then
        # shellcheck source=/dev/null
        source "$atb"
    fi
    set -u
}

# "0,1,...,N-1"
first_devices() {
    local n=$1 list="" i
    for ((i = 0; i < n; i++)); do
        list+="${list:+,}$i"
    done
    echo "$list"
}

# wait_health URL SECONDS PID LOG: until URL/health answers 200; fails if PID exits first or time runs out.
wait_health() {
    local url=$1 seconds=$2 pid=$3 log=$4 waited=0
    until curl -fsS -o /dev/null "$url/health" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "--- last lines of $log ---" >&2
            tail -n 40 "$log" >&2 || true
            die "the server (pid $pid) exited before $url/health answered; full log: $log"
        fi
        ((waited >= seconds)) && die "$url/health did not answer within $seconds s; log: $log"
        sleep 5
        waited=$((waited + 5))
    done
}

# stop_server PID: SIGTERM (vLLM's server shuts its engine down cleanly; a background job of a
# script ignores SIGINT), then SIGKILL after 60 s.
stop_server() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 1
    done
    kill -KILL "$pid" 2>/dev/null || true
}
