#!/usr/bin/env bash
# Memory of a big REPLACE import: the resident set (RSS) of every replica while a list of COUNT
# opt-outs is imported through ImportOptOuts and after it, on Redis (replica A applies the
# import, replica B only follows it) and on the embedded store (one replica). The figures go to
# stdout; the issue's target is under 64 MiB for every replica at 5 M opt-outs.
#
#   bash scripts/bench-import.sh                      # 5,000,000 opt-outs
#   COUNT=500000 bash scripts/bench-import.sh         # a quick look
#
# Everything listens on 127.0.0.1 and is stopped at the end. Not part of CI (minutes of CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${COUNT:-5000000}"
REDIS_PORT="${REDIS_PORT:-6398}"
A="127.0.0.1:${A_PORT:-50261}"
B="127.0.0.1:${B_PORT:-50262}"
source scripts/bench-lib.sh
"$bin/optout" keys audit-key >"$work/audit.key"

rss() { awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Samples the RSS of the given pids every 100 ms into $work/peak-<pid> until $work/stop exists.
sample() {
    rm -f "$work/stop"
    (
        declare -A peak
        for p in "$@"; do peak[$p]=0; done
        until [ -e "$work/stop" ]; do
            for p in "$@"; do
                r=$(rss "$p")
                [ "$r" -gt "${peak[$p]}" ] && peak[$p]=$r
            done
            sleep 0.1
        done
        for p in "$@"; do echo "${peak[$p]}" >"$work/peak-$p"; done
    ) &
    sampler=$!
}
stop_sampling() { touch "$work/stop"; wait "$sampler"; }

serve() { # name address extra-args...
    local name=$1 addr=$2; shift 2
    OPTOUT_LOG=warn "$bin/optout" serve --listen "$addr" --filter-capacity "$COUNT" \
        --audit-key-file "$work/audit.key" --check-log-dir "$work/check-log-$name" \
        --max-message-bytes 67108864 "$@" 2>"$work/$name.log" &
    pids+=($!)
    until "$bin/optout" admin --server "http://$addr" status >/dev/null 2>&1; do sleep 0.2; done
}

seed() { # address
    "$bin/optout-loadtest" seed --server "http://$1" --count "$COUNT" \
        >"$work/seed.log" 2>&1
}

echo "== Redis: replica A applies a REPLACE import of $COUNT opt-outs, replica B follows"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
    --dir "$work" --logfile "$work/redis.log" --daemonize no &
pids+=($!)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
url="redis://127.0.0.1:$REDIS_PORT"
"$bin/optout" init-store --redis-url "$url" >/dev/null
serve a "$A" --redis-url "$url"
a_pid=${pids[-1]}
serve b "$B" --redis-url "$url"
b_pid=${pids[-1]}
echo "  SERVING, empty: A $(rss "$a_pid") MiB, B $(rss "$b_pid") MiB"
sample "$a_pid" "$b_pid"
start=$SECONDS
seed "$A"
# B has caught up when its filter reflects the store's version (and is fresh): bench-lib.sh.
until caught_up "http://$B"; do
    sleep 0.5
    [ $((SECONDS - start)) -gt 600 ] && { echo "B did not catch up" >&2; break; }
done
echo "  B caught up $((SECONDS - start)) s after the seed started"
sleep 3
stop_sampling
echo "  during the import (peak): A $(cat "$work/peak-$a_pid") MiB, B $(cat "$work/peak-$b_pid") MiB"
echo "  after it: A $(rss "$a_pid") MiB, B $(rss "$b_pid") MiB"
echo "  seed: $(tail -1 "$work/seed.log")"

echo "== Embedded store: one replica applies a REPLACE import of $COUNT opt-outs"
serve e "127.0.0.1:${E_PORT:-50263}" --data-dir "$work/embedded"
e_pid=${pids[-1]}
echo "  SERVING, empty: $(rss "$e_pid") MiB"
sample "$e_pid"
seed "127.0.0.1:${E_PORT:-50263}"
sleep 3
stop_sampling
echo "  during the import (peak): $(cat "$work/peak-$e_pid") MiB"
echo "  after it: $(rss "$e_pid") MiB"
echo "  seed: $(tail -1 "$work/seed.log")"
