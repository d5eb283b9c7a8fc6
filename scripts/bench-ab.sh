#!/usr/bin/env bash
# Before and after: the server CPU per number of two (or more) builds of `optout`, in alternating
# rounds against one seeded Redis, each round ending with the echo server (the transport floor),
# so a change is judged by the median of same-run figures rather than against another day's.
#
#   cp target/release/optout /tmp/optout-before   # then build the change
#   bash scripts/bench-ab.sh before=/tmp/optout-before after=target/release/optout
#   COUNT=10000 SHARE=0 bash scripts/bench-ab.sh ...   # the filter in cache, nothing from Redis
#   MODE=single bash scripts/bench-ab.sh ...           # one number a request
#
# Each line: the label, the server's user + system CPU per number checked (from /proc, warm-up
# included in both the CPU and the count), and the rate. The first build seeds the store, which
# the current release build's init-store made. Not part of CI (minutes of CPU); everything
# listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${COUNT:-5000000}"
SHARE="${SHARE:-0.05}"
MODE="${MODE:-batch}"
ROUNDS="${ROUNDS:-4}"
SECONDS_EACH="${SECONDS_EACH:-8}"
REDIS_PORT="${REDIS_PORT:-6398}"
SERVICE="127.0.0.1:${SERVICE_PORT:-50261}"
ECHO="127.0.0.1:${ECHO_PORT:-50262}"
[ $# -ge 1 ] || {
    echo "usage: bash scripts/bench-ab.sh label=path-to-optout ..." >&2
    exit 2
}
source scripts/bench-lib.sh

redis_store ab "$REDIS_PORT"
redis_url="redis://127.0.0.1:$REDIS_PORT"

serve() { # optout-binary; sets server_pid
    OPTOUT_LOG=warn "$1" serve --listen "$SERVICE" --redis-url "$redis_url" --rate-limit 0 \
        --filter-capacity "$COUNT" --max-message-bytes 67108864 \
        --check-log-dir "$work/check-log" 2>>"$work/service.log" &
    server_pid=$!
    pids+=($server_pid)
    until_up "http://$SERVICE"
    wait_caught_up "http://$SERVICE"
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

serve "${1#*=}"
"$bin/optout-loadtest" seed --server "http://$SERVICE" --count "$COUNT" >/dev/null
stop "$server_pid"
OPTOUT_LOG=warn "$bin/optout-loadtest" echo-server --listen "$ECHO" 2>"$work/echo.log" &
echo_pid=$!
pids+=($echo_pid)

if [ "$MODE" = batch ]; then
    shape=(--mode batch --batch 1000 --concurrency 16 --connections 4)
else
    shape=(--mode single --concurrency 64 --connections 4)
fi
measure() { # label pid address
    local t0 line rate
    t0=$(ticks "$2")
    line=$("$bin/optout-loadtest" run --server "http://$3" --count "$COUNT" "${shape[@]}" \
        --opted-share "$SHARE" --duration "$SECONDS_EACH" --warmup 1 --no-leak-check | tail -1)
    rate=$(grep -o '[0-9]* numbers/s' <<<"$line" | awk '{print $1}')
    awk -v l="$1" -v t=$(($(ticks "$2") - t0)) -v n="$rate" -v d="$SECONDS_EACH" \
        -v hz="$(getconf CLK_TCK)" \
        'BEGIN {printf "%s %.1f ns a number (%d numbers/s)\n", l, t / hz * 1e9 / (n * (d + 1)), n}'
}
for ((r = 1; r <= ROUNDS; r++)); do
    for build in "$@"; do
        serve "${build#*=}"
        measure "${build%%=*}" "$server_pid" "$SERVICE" | tee -a "$work/rounds.txt"
        stop "$server_pid"
    done
    measure echo "$echo_pid" "$ECHO" | tee -a "$work/rounds.txt"
done
echo "medians:"
for label in $(awk '{print $1}' "$work/rounds.txt" | sort -u); do
    printf '%s %s ns\n' "$label" "$(grep "^$label " "$work/rounds.txt" | awk '{print $2}' | median)"
done
