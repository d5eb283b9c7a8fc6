#!/usr/bin/env bash
# What recording checks costs, in the two places they can go: the batch workload (1,000 numbers a
# message, concurrency 16) against the service with check records in Redis (the default), then
# with them on disk (--check-log-dir). For each: numbers checked per second, Redis used_memory
# growth during the workload, check-log bytes written, and bytes per checked number.
#
#   bash scripts/bench-audit.sh                     # 500,000 opt-outs, 60 s per mode
#   COUNT=200000 SECONDS_EACH=20 bash scripts/bench-audit.sh
#
# Everything listens on 127.0.0.1 and is stopped at the end. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${COUNT:-500000}"
SECONDS_EACH="${SECONDS_EACH:-60}"
REDIS_PORT="${REDIS_PORT:-6398}"
SERVICE="127.0.0.1:${SERVICE_PORT:-50261}"
source scripts/bench-lib.sh
"$bin/optout" keys audit-key >"$work/audit.key" 2>/dev/null

mem() { redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }

for mode in redis disk; do
    rm -rf "$work/redis" "$work/check-log"
    mkdir -p "$work/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
        --appendfsync always --dir "$work/redis" --logfile "$work/redis.log" --daemonize no &
    redis_pid=$!
    pids+=($redis_pid)
    until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
    url="redis://127.0.0.1:$REDIS_PORT"
    "$bin/optout" init-store --redis-url "$url" >/dev/null
    extra=(--check-log-in-store)
    [ "$mode" = disk ] && extra=(--check-log-dir "$work/check-log")
    OPTOUT_LOG=warn "$bin/optout" serve --listen "$SERVICE" --redis-url "$url" --rate-limit 0 \
        --filter-capacity "$COUNT" --audit-key-file "$work/audit.key" "${extra[@]}" \
        2>"$work/service-$mode.log" &
    service_pid=$!
    pids+=($service_pid)
    until "$bin/optout" admin --server "http://$SERVICE" status >/dev/null 2>&1; do sleep 0.2; done
    "$bin/optout-loadtest" seed --server "http://$SERVICE" --count "$COUNT" >/dev/null
    sleep 2
    before=$(mem)
    out=$("$bin/optout-loadtest" run --server "http://$SERVICE" --label "$mode" --count "$COUNT" \
        --duration "$SECONDS_EACH" --mode batch --batch 1000 --concurrency 16 --connections 4 \
        --json "$work/$mode.json")
    sleep 1
    after=$(mem)
    # The measured numbers (the report's first entry: the service); the 2 s warm-up is recorded
    # too, so the bytes per number below are slightly high.
    checked=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d=d[0] if isinstance(d,list) else d; print(d['numbers'])" "$work/$mode.json")
    disk=0
    [ -d "$work/check-log" ] && disk=$(du -sb "$work/check-log" | awk '{print $1}')
    echo "$out"
    echo "mode $mode: Redis used_memory during the workload $before -> $after bytes ($(( (after - before) / 1048576 )) MiB); check log on disk $disk bytes; numbers checked $checked"
    if [ "$checked" -gt 0 ]; then
        awk -v r="$((after - before))" -v d="$disk" -v n="$checked" \
            'BEGIN {printf "  per checked number: Redis %.2f bytes, disk %.2f bytes\n", r/n, d/n}'
    fi
    kill "$service_pid" "$redis_pid"
    wait "$service_pid" "$redis_pid" 2>/dev/null || true
done
