#!/usr/bin/env bash
# Before and after: the server CPU per number of two (or more) builds of `optout`, in alternating
# rounds against one seeded Redis, each round ending with the echo server (the transport floor),
# so a change is judged by the median of same-run figures rather than against another day's.
#
#   cp target/release/optout /tmp/optout-before   # then build the change
#   bash scripts/bench-ab.sh before=/tmp/optout-before after=target/release/optout
#   COUNT=10000 SHARE=0 bash scripts/bench-ab.sh ...   # the filter in cache, nothing from Redis
#   MODE=single bash scripts/bench-ab.sh ...           # one number a request
#   SHARE="0 0.05" bash scripts/bench-ab.sh ...        # each build at each share, same rounds
#
# Each line: the label (with "@share" when SHARE lists more than one), the server's user + system
# CPU per number checked (from /proc, warm-up included in both the CPU and the count), Redis's
# CPU per number over the same seconds, and the rate. At the end, the medians of each, and of each
# build's ratio to the echo of its own round. The first build seeds the store, which
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
measure() { # label pid address share
    local t0 r0 line rate
    t0=$(ticks "$2")
    r0=$(ticks "$ab_redis")
    line=$("$bin/optout-loadtest" run --server "http://$3" --count "$COUNT" "${shape[@]}" \
        --opted-share "$4" --duration "$SECONDS_EACH" --warmup 1 --no-leak-check | tail -1)
    rate=$(grep -o '[0-9]* numbers/s' <<<"$line" | awk '{print $1}')
    awk -v l="$1" -v t=$(($(ticks "$2") - t0)) -v r=$(($(ticks "$ab_redis") - r0)) -v n="$rate" \
        -v d="$SECONDS_EACH" -v hz="$(getconf CLK_TCK)" \
        'BEGIN {k = 1e9 / hz / (n * (d + 1))
            printf "%s %.1f ns a number, Redis %.1f ns (%d numbers/s)\n", l, t * k, r * k, n}'
}
read -ra shares <<<"$SHARE"
for ((r = 1; r <= ROUNDS; r++)); do
    for build in "$@"; do
        serve "${build#*=}"
        for share in "${shares[@]}"; do
            label="${build%%=*}"
            [ ${#shares[@]} -eq 1 ] || label="$label@$share"
            measure "$label" "$server_pid" "$SERVICE" "$share" | tee -a "$work/round.txt"
        done
        stop "$server_pid"
    done
    measure echo "$echo_pid" "$ECHO" 0 | tee -a "$work/round.txt"
    # Each line of the round with its ratio to this round's echo.
    awk 'NR == FNR {if ($1 == "echo") e = $2; next} {print $0, $2 / e}' \
        "$work/round.txt" "$work/round.txt" >>"$work/rounds.txt"
    rm "$work/round.txt"
done
echo "medians:"
for label in $(awk '{print $1}' "$work/rounds.txt" | sort -u); do
    printf '%s %s ns, Redis %s ns, %.2fx the echo\n' "$label" \
        "$(grep "^$label " "$work/rounds.txt" | awk '{print $2}' | median)" \
        "$(grep "^$label " "$work/rounds.txt" | awk '{print $7}' | median)" \
        "$(grep "^$label " "$work/rounds.txt" | awk '{print $NF}' | median)"
done
