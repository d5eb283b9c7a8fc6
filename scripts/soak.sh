#!/usr/bin/env bash
# A long steady check load on each store, watching the replica's memory: does it stay flat?
# For each store (one Redis, a Redis Cluster of 3 masters and 3 replicas, the embedded store):
# start it on loopback, start the replica under load (and, on Redis, an idle second replica),
# seed synthetic opt-outs, run the batch workload (1,000 numbers a request, 8 in flight) for
# MINUTES, and sample each replica's resident memory from /proc every SAMPLE seconds. Nothing
# scrapes the metrics endpoint while it runs (issue 32: histogram samples piled up on the heap of
# a replica nobody scraped). Writes the soak section of BENCHMARKS.md.
#
#   bash scripts/soak.sh                                  # 10 minutes on each store
#   MINUTES=3 STORES="single" bash scripts/soak.sh        # a quick look
#
# The slope is the resident memory gained from the end of the warm-up (the first minute) to the
# end, per million numbers checked in between. Not part of CI (minutes of a whole machine).
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES="${MINUTES:-10}"
STORES="${STORES:-single cluster embedded}"
COUNT="${COUNT:-1000000}"
SAMPLE="${SAMPLE:-30}"
WARMUP="${WARMUP:-60}"
BASE_PORT="${BASE_PORT:-7700}"
SERVICE="127.0.0.1:${SERVICE_PORT:-50361}"
IDLE="127.0.0.1:$((${SERVICE_PORT:-50361} + 1))"
METRICS="127.0.0.1:$((${SERVICE_PORT:-50361} + 2))"
OUT="${OUT:-BENCHMARKS.md}"
source scripts/topology-lib.sh
rss() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
anon() { awk '/^RssAnon:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
# The replica's check log, bounded: at millions of numbers a second it writes about 50 MB/s.
serve() { # listen dir extra-args...
    local listen=$1 dir=$2
    shift 2
    OPTOUT_LOG=warn "$bin/optout" serve --listen "$listen" --rate-limit 0 --filter-capacity "$COUNT" \
        --max-message-bytes 67108864 --data-dir "$dir" --check-log-dir "$dir/check-log" \
        --check-log-segment-mib 64 --check-log-max-backups 2 "$@" 2>"$dir.log" &
    pids+=($!)
}

rows="$work/rows.txt"
: >"$rows"
for kind in $STORES; do
    d="$work/$kind"
    mkdir -p "$d"
    case "$kind" in
    single)
        node "$BASE_PORT" "$d/n0"
        args=(--redis-url "redis://127.0.0.1:$BASE_PORT")
        ;;
    cluster)
        cluster "$BASE_PORT" "$d"
        args=("${store[@]}")
        ;;
    embedded)
        args=()
        ;;
    *) echo "unknown store $kind (single, cluster, embedded)" >&2; exit 2 ;;
    esac
    [ "${#args[@]}" -gt 0 ] && "$bin/optout" init-store "${args[@]}" >/dev/null
    serve "$SERVICE" "$d/a" "${args[@]}" --metrics-listen "$METRICS"
    loaded=$!
    idle=""
    if [ "${#args[@]}" -gt 0 ]; then
        serve "$IDLE" "$d/b" "${args[@]}"
        idle=$!
    fi
    # Both replicas up, or the run stops saying which did not start (a port still in use).
    for r in "$SERVICE/$loaded/a" ${idle:+"$IDLE/$idle/b"}; do
        IFS=/ read -r addr pid name <<<"$r"
        until "$bin/optout" admin --server "http://$addr" status >/dev/null 2>&1; do
            kill -0 "$pid" 2>/dev/null || { echo "replica $name did not start: $(tail -1 "$d/$name.log")" >&2; exit 1; }
            sleep 0.2
        done
    done
    "$bin/optout-loadtest" seed --server "http://$SERVICE" --count "$COUNT" >/dev/null
    sleep 5
    seconds=$((MINUTES * 60))
    "$bin/optout-loadtest" run --server "http://$SERVICE" --label "$kind" --count "$COUNT" \
        --mode batch --batch 1000 --concurrency 8 --connections 2 --duration "$seconds" \
        >"$d/run.txt" 2>&1 &
    load=$!
    samples="$d/samples.txt"
    : >"$samples"
    start=$(date +%s)
    while kill -0 "$load" 2>/dev/null; do
        t=$(($(date +%s) - start))
        echo "$t $(rss "$loaded") $(anon "$loaded") ${idle:+$(rss "$idle")}" >>"$samples"
        sleep "$SAMPLE"
    done
    wait "$load" || true
    cat "$d/run.txt"
    echo "$kind: seconds, RSS MiB, RssAnon MiB (loaded replica)${idle:+, RSS MiB (idle replica)}:"
    tr '\n' ';' <"$samples"
    echo
    rate=$(grep -o '[0-9]* numbers/s' "$d/run.txt" | head -1 | tr -dc '0-9')
    awk -v store="$kind" -v warm="$WARMUP" -v rate="${rate:-0}" '
        { t[NR] = $1; r[NR] = $2; a[NR] = $3; b[NR] = $4 }
        END {
            w = 1; for (i = 1; i <= NR; i++) if (t[i] <= warm) w = i;
            m = int((w + NR) / 2);
            numbers = rate * (t[NR] - t[w]);
            slope = numbers > 0 ? (r[NR] - r[w]) / (numbers / 1e6) * 1024 : 0;
            idle = (b[NR] == "") ? "-" : sprintf("%s -> %s", b[1], b[NR]);
            printf "| %s | %d | %.2f | %s (%ds) | %s (%ds) | %s (%ds) | %s | %+.1f KiB | %s |\n",
                store, t[NR], rate / 1e6, r[w], t[w], r[m], t[m], r[NR], t[NR], a[NR],
                slope, idle;
        }' "$samples" | tee -a "$rows"
    stop_all
done

section="$work/section.md"
{
    echo "<!-- soak: written by scripts/soak.sh -->"
    echo "## Soak: resident memory under a steady check load"
    echo
    echo "Written by \`scripts/soak.sh\` on $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD), $(nproc)"
    echo "cores shared by the load, Redis and the replicas; $COUNT opt-outs; batches of 1,000 numbers, 8 in"
    echo "flight, for $MINUTES minutes; nothing scraping the metrics. RSS of the replica under load in MiB,"
    echo "sampled from /proc every $SAMPLE s; the slope is what it gained from the end of the $WARMUP s warm-up to the"
    echo "end, per million numbers checked. On Redis a second, idle replica runs beside it."
    echo
    echo "| store | seconds | M numbers/s | RSS after warm-up | RSS middle | RSS end | RssAnon end | slope per M numbers | idle replica RSS |"
    echo "|---|---|---|---|---|---|---|---|---|"
    cat "$rows"
    echo "<!-- /soak -->"
} >"$section"
# Replace the soak section of $OUT (bench.sh keeps it when it rewrites the rest), or append it.
if [ -f "$OUT" ] && grep -q '^<!-- soak: ' "$OUT"; then
    awk -v file="$section" '
        /^<!-- soak: / { while ((getline line < file) > 0) print line; skip = 1; next }
        /^<!-- \/soak -->/ { skip = 0; next }
        !skip' "$OUT" >"$work/out.md"
    cp "$work/out.md" "$OUT"
else
    { [ -f "$OUT" ] && echo; cat "$section"; } >>"$OUT"
fi
echo "wrote the soak section of $OUT"
