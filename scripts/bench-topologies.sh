#!/usr/bin/env bash
# The same service on each Redis topology: one Redis; Sentinel (1 master, 1 replica, 3 sentinels);
# Redis Cluster (3 masters, 3 replicas). For each: start the topology on loopback, initialise the
# store, start the service (release build), seed synthetic opt-outs through ImportOptOuts, run the
# batch and single-number workloads, and write BENCHMARKS-topologies.md.
#
#   bash scripts/bench-topologies.sh                        # 5,000,000 opt-outs, 10 s each
#   COUNT=200000 SECONDS_EACH=3 bash scripts/bench-topologies.sh   # a quick look
#   MODES="cluster" bash scripts/bench-topologies.sh         # one topology
#
# Everything listens on 127.0.0.1 and is stopped at the end. Not part of CI (minutes of CPU). On
# one machine the replicas and sentinels share its cores with the service and the load: the
# figures compare topologies on equal hardware, they are not a capacity plan.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${COUNT:-5000000}"
SECONDS_EACH="${SECONDS_EACH:-10}"
MODES="${MODES:-single sentinel cluster}"
BASE_PORT="${BASE_PORT:-7400}"
SERVICE="127.0.0.1:${SERVICE_PORT:-50261}"
OUT="${OUT:-BENCHMARKS-topologies.md}"
source scripts/topology-lib.sh

results="$work/results.txt"
: >"$results"
for mode in $MODES; do
    d="$work/$mode"
    case "$mode" in
    single)
        node "$BASE_PORT" "$d/n0"
        store=(--redis-url "redis://127.0.0.1:$BASE_PORT")
        ;;
    sentinel)
        node "$BASE_PORT" "$d/m"
        node $((BASE_PORT + 1)) "$d/r" --replicaof 127.0.0.1 "$BASE_PORT"
        for i in 0 1 2; do
            mkdir -p "$d/s$i"
            printf 'sentinel monitor optout 127.0.0.1 %s 2\nsentinel down-after-milliseconds optout 2000\n' \
                "$BASE_PORT" >"$d/s$i/sentinel.conf"
            redis-server "$d/s$i/sentinel.conf" --sentinel --port $((BASE_PORT + 10 + i)) \
                --bind 127.0.0.1 --dir "$d/s$i" --logfile "$d/s$i/redis.log" &
            pids+=($!)
        done
        until redis-cli -p "$BASE_PORT" info replication | grep -q 'state=online'; do sleep 0.1; done
        store=(--redis-sentinel "127.0.0.1:$((BASE_PORT + 10)),127.0.0.1:$((BASE_PORT + 11)),127.0.0.1:$((BASE_PORT + 12))"
            --redis-sentinel-master optout)
        until redis-cli -p $((BASE_PORT + 10)) sentinel master optout | grep -A1 '^num-other-sentinels$' | grep -q '^2$'; do sleep 0.2; done
        ;;
    cluster)
        cluster "$BASE_PORT" "$d"
        ;;
    *) echo "unknown mode $mode (single, sentinel, cluster)" >&2; exit 2 ;;
    esac
    "$bin/optout" init-store "${store[@]}" >/dev/null
    OPTOUT_LOG=warn "$bin/optout" serve --listen "$SERVICE" "${store[@]}" \
        --rate-limit 0 --filter-capacity "$COUNT" --snapshot-interval-secs 2 \
        --max-message-bytes 67108864 2>"$d/service.log" &
    service_pid=$!
    pids+=($service_pid)
    until "$bin/optout" admin --server "http://$SERVICE" status >/dev/null 2>&1; do sleep 0.2; done
    seed=$("$bin/optout-loadtest" seed --server "http://$SERVICE" --count "$COUNT")
    echo "$mode: $seed" | tee -a "$results"
    for workload in "batch --batch 1000 --concurrency 16" "single --concurrency 64"; do
        # shellcheck disable=SC2086
        "$bin/optout-loadtest" run --server "http://$SERVICE" --label "$mode" --count "$COUNT" \
            --duration "$SECONDS_EACH" --connections 4 --mode $workload | tee -a "$results"
    done
    echo "$mode: service resident memory $(( $(awk '/^VmRSS:/ {print $2}' "/proc/$service_pid/status") / 1024 )) MiB" \
        | tee -a "$results"
    stop_all
done

{
    echo "# Benchmarks by Redis topology"
    echo
    echo "Written by \`scripts/bench-topologies.sh\` on $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD),"
    echo "$(nproc) cores shared by the load, the service and every Redis process of the topology;"
    echo "Redis $(redis-server --version | awk '{print $3}' | cut -d= -f2), $COUNT opt-outs, 5% opted-out traffic,"
    echo "$SECONDS_EACH s per workload after 2 s warm-up. single: one Redis; sentinel: 1 master, 1"
    echo "replica, 3 sentinels, each change confirmed by the replica (WAIT); cluster: 3 masters,"
    echo "3 replicas, 64 shards, each change confirmed by every master's replica."
    echo
    echo '```'
    cat "$results"
    echo '```'
} >"$OUT"
echo "wrote $OUT"
