#!/usr/bin/env bash
# --server-bin for loadgen: for `serve` with IDLE_CONNS > 0, a background subshell polls the port
# every ~2 ms, SIGSTOPs the loadgen (our parent) the moment the server accepts, then runs idle.py,
# which opens IDLE_CONNS idle keep-alive connections (each answered GET /healthz), records whether the
# loadgen already held connections to the server when stopped (then the gate was late and the run
# is invalid), and SIGCONTs the loadgen. The wrapper execs the real rolesync (same pid, so the
# loadgen's stats and SIGTERM reach the server). A safety SIGCONT fires after 60 s.
export WRAP_PID=$$
if [ "${1:-}" = serve ] && [ "${IDLE_CONNS:-0}" -gt 0 ]; then
    port=${ROLESYNC_LISTEN##*:}
    resume=0
    [ "$(cat /proc/$PPID/comm)" = loadgen ] && resume=$PPID
    (
        for i in $(seq 1 10000); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.002
        done
        [ "$resume" != 0 ] && kill -STOP "$resume"
        (sleep 60; [ "$resume" != 0 ] && kill -CONT "$resume" 2>/dev/null) &
        exec python3 "$(dirname "$0")/idle.py" --port "$port" --pid "$WRAP_PID" -n "$IDLE_CONNS" \
            --max-secs 120 --resume-pid "$resume"
    ) > "${IDLE_LOG:-/dev/null}" 2>&1 < /dev/null &
fi
exec "${REAL_ROLESYNC:-$(dirname "$0")/../../target/release/rolesync}" "$@"
