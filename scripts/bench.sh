#!/usr/bin/env bash
# The load-test matrix: starts redis-server and the service (release build) on loopback, seeds
# synthetic opt-outs, runs each workload against the service, the Redis baseline and the echo
# server (the transport floor), cross-checks both floors with h2load (an independent client) when
# it is installed, and writes BENCHMARKS.md with the figures and the ratios.
#
#   bash scripts/bench.sh                 # 5,000,000 opt-outs, 10 s per workload
#   COUNT=200000 SECONDS_EACH=3 bash scripts/bench.sh   # a quick look
#   COVERAGE=population POOL=5000000 bash scripts/bench.sh
#       # population mode: the store is seeded by a national check round trip of the opt-outs
#       # and POOL clean numbers, and the traffic's clean numbers come from that pool
#
# Everything listens on 127.0.0.1 and is stopped at the end. Not part of CI (minutes of CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${COUNT:-5000000}"
SECONDS_EACH="${SECONDS_EACH:-10}"
# The workloads the ratios are taken from (batch and single, service and echo) run RUNS times,
# alternating; the targets table takes the median of each.
RUNS="${RUNS:-3}"
REDIS_PORT="${REDIS_PORT:-6399}"
SERVICE="127.0.0.1:${SERVICE_PORT:-50251}"
ECHO="127.0.0.1:${ECHO_PORT:-50252}"
OUT="${OUT:-BENCHMARKS.md}"
# The soak section (scripts/soak.sh) is kept when the rest is written again.
soak_section=$(awk '/^<!-- soak: /,/^<!-- \/soak -->/' "$OUT" 2>/dev/null || true)
# The HTML page of every run (throughput over time, latency histograms, percentiles).
REPORT="${REPORT:-target/bench-report.html}"
COVERAGE="${COVERAGE:-list}"
POOL="${POOL:-0}"
if [ "$COVERAGE" = population ] && [ "$POOL" = 0 ]; then
    echo "COVERAGE=population needs POOL, the clean numbers of the checked population" >&2
    exit 1
fi
# The population's clean numbers (all of them in list mode), for every loadtest command.
pool=(--checked-pool "$POOL")
source scripts/bench-lib.sh
median() { sort -n | awk '{v[NR] = $1} END {if (NR) print v[int((NR + 1) / 2)]}'; }

# Persistence as the service requires of a single Redis: every acknowledged write fsynced.
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always --dir "$work" \
    --logfile "$work/redis.log" --daemonize no &
redis_pid=$!
pids+=($redis_pid)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
redis_url="redis://127.0.0.1:$REDIS_PORT"
owner=()
[ "$COVERAGE" = population ] && owner=(--organisation BENCH)
"$bin/optout" init-store --redis-url "$redis_url" --national-coverage "$COVERAGE" "${owner[@]}" >/dev/null

OPTOUT_LOG=warn "$bin/optout" serve --listen "$SERVICE" --redis-url "$redis_url" \
    --rate-limit 0 --filter-capacity "$COUNT" --snapshot-interval-secs 2 \
    --max-message-bytes 67108864 --check-log-dir "$work/check-log" 2>"$work/service.log" &
service_pid=$!
pids+=($service_pid)
OPTOUT_LOG=warn "$bin/optout-loadtest" echo-server --listen "$ECHO" 2>"$work/echo.log" &
echo_pid=$!
pids+=($echo_pid)
until "$bin/optout" admin --server "http://$SERVICE" status >/dev/null 2>&1; do sleep 0.2; done

base_mem=$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
national_check=()
[ "$COVERAGE" = population ] && national_check=(--national-check)
seed_out=$("$bin/optout-loadtest" seed --server "http://$SERVICE" --count "$COUNT" "${pool[@]}" "${national_check[@]}" \
    --baseline-redis-url "$redis_url")
echo "$seed_out"
# Until the replica's filter reflects the import (the store's version, and fresh), a "maybe" finds
# the store ahead of the filter and the check asks the store about every number of the batch: the
# first workload would measure that catching-up, and the half-peak rates below are taken from it.
caught_up() {
    "$bin/optout" admin --server "http://$SERVICE" status 2>/dev/null | awk '
        /^version:/ {v = $2} /^filter version:/ {f = $3; fresh = ($4 == "(fresh,")}
        END {exit !(v != "" && v == f && fresh)}'
}
for ((i = 0; i < 600; i++)); do caught_up && break; sleep 0.1; done
caught_up || echo "warning: the filter did not catch up with the store within 60 s of seeding" >&2

run() { # label server extra-args...
    local label=$1 server=$2
    shift 2
    "$bin/optout-loadtest" run --server "$server" --label "$label" --count "$COUNT" "${pool[@]}" \
        --duration "${DURATION:-$SECONDS_EACH}" --json "$work/$label-$RANDOM.json" "$@"
}
results="$work/results.txt"
: >"$results"
# What the batch workload costs Redis and the check log: used_memory and the check log's bytes on
# disk before and after it (5 minutes of it: SECONDS_EACH=300).
redis_used() { redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
log_bytes() { du -sb "$work/check-log" 2>/dev/null | awk '{print $1}'; }
mem_before=$(redis_used)
log_before=$(log_bytes)
# The service's batch workload, then the same against the plain Redis set (reads only).
"$bin/optout-loadtest" run --server "http://$SERVICE" --label service --count "$COUNT" "${pool[@]}" \
    --duration "$SECONDS_EACH" --json "$work/batch.json" --mode batch --batch 1000 \
    --concurrency 16 --connections 4 --baseline redis --baseline-redis-url "$redis_url" \
    | tee -a "$results"
sleep 1
mem_after=$(redis_used)
log_after=$(log_bytes)
# The service's report comes first in the JSON.
batch_numbers=$(awk -F: '/"numbers":/ {gsub(/[ ,]/, "", $2); print $2; exit}' "$work/batch.json")
batch_seconds=$(awk -F: '/"seconds":/ {gsub(/[ ,]/, "", $2); print $2; exit}' "$work/batch.json")
{
    run echo "http://$ECHO" --mode batch --batch 1000 --concurrency 16 --connections 4 --no-leak-check
    run service "http://$SERVICE" --mode single --concurrency 64 --connections 4 \
        --baseline redis --baseline-redis-url "$redis_url"
    run echo "http://$ECHO" --mode single --concurrency 64 --connections 4 --no-leak-check
} | tee -a "$results"

# The ratio workloads again, alternating service and echo, for the medians; each also measures
# the CPU the server, Redis and the client spent on it (their user + system ticks from /proc; the
# client is this loop's child), per number checked, the warm-up counted at the measured rate.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Ticks of the reaped children of process $1 (the shell running the loop: its clients).
child_ticks() { awk '{print $16 + $17}' "/proc/$1/stat"; }
cpu="$work/cpu.txt"
: >"$cpu"
run_cpu() { # label server-pid mode server-address run-args...
    local label=$1 pid=$2 mode=$3 address=$4 me=$BASHPID s0 r0 c0 line
    shift 4
    s0=$(ticks "$pid") r0=$(ticks "$redis_pid") c0=$(child_ticks "$me")
    line=$(run "$label" "$address" --mode "$mode" "$@")
    echo "$line"
    awk -v l="$label" -v m="$mode" -v s=$(($(ticks "$pid") - s0)) -v r=$(($(ticks "$redis_pid") - r0)) \
        -v c=$(($(child_ticks "$me") - c0)) -v d="$SECONDS_EACH" -v line="$line" 'BEGIN {
        n = split(line, f, " "); for (i = 2; i <= n; i++) if (f[i] == "numbers/s") rate = f[i-1];
        total = rate * (d + 2); tick = 1e9 / '"$(getconf CLK_TCK)"';
        if (total > 0) printf "%s %s %.1f %.1f %.1f\n", l, m, s * tick / total, r * tick / total, c * tick / total }' >>"$cpu"
}
for ((i = 2; i <= RUNS; i++)); do
    run_cpu service "$service_pid" batch "http://$SERVICE" --batch 1000 --concurrency 16 --connections 4
    run_cpu echo "$echo_pid" batch "http://$ECHO" --batch 1000 --concurrency 16 --connections 4 --no-leak-check
    run_cpu service "$service_pid" single "http://$SERVICE" --concurrency 64 --connections 4
    run_cpu echo "$echo_pid" single "http://$ECHO" --concurrency 64 --connections 4 --no-leak-check
done | tee -a "$results"
# The median CPU of each of the four workloads, in ns per number checked (a single-number
# request is one number).
cpu_rows=$(for w in "service batch" "echo batch" "service single" "echo single"; do
    m() { grep "^$w " "$cpu" | awk -v k="$1" '{print $k}' | median; }
    printf '| %s | %s | %s | %s |\n' "$w" "$(m 3)" "$(m 4)" "$(m 5)"
done)

peak_batch=$(grep -E '^service +batch' "$results" | head -1 | awk '{for(i=1;i<=NF;i++) if($i=="req/s") print $(i-1)}')
peak_single=$(grep -E '^service +single' "$results" | head -1 | awk '{for(i=1;i<=NF;i++) if($i=="req/s") print $(i-1)}')
half_batch=$(awk -v r="$peak_batch" 'BEGIN {printf "%.0f", r/2}')
half_single=$(awk -v r="$peak_single" 'BEGIN {printf "%.0f", r/2}')
{
    run service "http://$SERVICE" --mode batch --batch 1000 --concurrency 64 --connections 4 \
        --rate "$half_batch"
    run service "http://$SERVICE" --mode single --concurrency 128 --connections 4 \
        --rate "$half_single"
    # The echo server at the same rates: its p99 is the transport's at that load.
    run echo "http://$ECHO" --mode batch --batch 1000 --concurrency 64 --connections 4 \
        --rate "$half_batch" --no-leak-check
    run echo "http://$ECHO" --mode single --concurrency 128 --connections 4 \
        --rate "$half_single" --no-leak-check
    # CheckStream: 10 million numbers (1,000 messages of 10,000) end to end, no warm-up.
    DURATION=120 run service "http://$SERVICE" --mode stream --batch 10000 --concurrency 1 \
        --connections 1 --count-requests 1000 --warmup 0
} | tee -a "$results"

# The same floors through an independent client: h2load posting one pre-framed request, so a
# slow harness cannot pass for a fast server (the same request every time: a best case for caches).
h2load_lines=()
if command -v h2load >/dev/null; then
    for batch in 1000 1; do
        body="$work/check-$batch.bin"
        "$bin/optout-loadtest" frame --count "$COUNT" "${pool[@]}" --batch "$batch" --out "$body"
        h2s=() h2e=()
        for ((i = 1; i <= RUNS; i++)); do
            h2s+=("$(h2load_rps "$SERVICE" "$body" "${H2LOAD_REQUESTS:-20000}" 4 16)")
            h2e+=("$(h2load_rps "$ECHO" "$body" "${H2LOAD_REQUESTS:-20000}" 4 16)")
        done
        s=$(printf '%s\n' "${h2s[@]}" | median)
        e=$(printf '%s\n' "${h2e[@]}" | median)
        h2load_lines+=("$(awk -v b="$batch" -v s="$s" -v e="$e" 'BEGIN {
            printf "- Check of %d numbers, 4 connections x 16 streams, median of '"$RUNS"': service %.0f req/s (%.0f numbers/s), echo %.0f req/s, ratio %.2f", b, s, s * b, e, s / e }')")
    done
else
    h2load_lines+=("- not measured: h2load is missing (apt-get install nghttp2-client)")
fi

rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$service_pid/status")
status=$("$bin/optout" admin --server "http://$SERVICE" status)

# The targets of issue 15, from the lines above: (label, target, measured, met).
field() { # line-pattern word-before-which → the value before that word in the first matching line
    grep -E "$1" "$results" | head -1 | awk -v w="$2" '{for (i = 2; i <= NF; i++) if ($(i) == w) {print $(i-1); exit}}'
}
# The median over the matching lines (the RUNS runs of a workload).
nps() {
    grep -E "$1" "$results" | awk '{for (i = 2; i <= NF; i++) if ($(i) == "numbers/s") print $(i-1)}' | median
}
# Each run's ratio, service over the echo run that followed it (the machine's noise, in view).
pair_ratios() { # service-pattern echo-pattern
    local rates='{for (i = 2; i <= NF; i++) if ($(i) == "numbers/s") print $(i-1)}'
    paste <(grep -E "$1" "$results" | awk "$rates") <(grep -E "$2" "$results" | awk "$rates") \
        | awk '{printf "%s%.2f", (NR > 1 ? ", " : ""), $1 / $2}'
}
p99() { grep -E "$1" "$results" | head -1 | awk '{for (i = 1; i <= NF; i++) if ($(i) == "p99") {print $(i+1); exit}}'; }
targets=$(
    sb=$(nps '^service +batch +batch +1000 conc +16'); eb=$(nps '^echo +batch +batch +1000 conc +16')
    ss=$(nps '^service +single batch +1 conc +64'); es=$(nps '^echo +single batch +1 conc +64')
    rb=$(pair_ratios '^service +batch +batch +1000 conc +16' '^echo +batch +batch +1000 conc +16')
    rs=$(pair_ratios '^service +single batch +1 conc +64' '^echo +single batch +1 conc +64')
    st=$(nps '^service +stream')
    sbp=$(p99 '^service +batch .*rate'); ebp=$(p99 '^echo +batch .*rate')
    ssp=$(p99 '^service +single .*rate'); esp=$(p99 '^echo +single .*rate')
    seed_rate=$(grep -o '([0-9]*/s)' <<<"$seed_out" | tr -dc '0-9')
    bits=$(awk '/^filter:/ {for (i = 1; i <= NF; i++) if ($(i) == "bits,") print $(i-1)}' <<<"$status")
    awk -v sb="$sb" -v eb="$eb" -v ss="$ss" -v es="$es" -v rb="$rb" -v rs="$rs" -v st="$st" -v rss="$((rss_kb / 1024))" \
        -v seed="$seed_rate" -v bits="$bits" -v n="$COUNT" -v sbp="$sbp" -v ebp="$ebp" \
        -v ssp="$ssp" -v esp="$esp" 'function row(what, target, got, met) {
            printf "| %s | %s | %s | %s |\n", what, target, got, met < 0 ? "reported" : met ? "yes" : "no" }
        BEGIN {
        row("Check of 1,000 numbers / echo floor (harness)", ">= 0.70", sprintf("%.2f (runs: %s)", sb / eb, rb), sb / eb >= 0.7);
        row("Check of 1 number / echo floor (harness)", ">= 0.90", sprintf("%.2f (runs: %s)", ss / es, rs), ss / es >= 0.9);
        row("CheckStream, 10 M numbers", "< 3 s", sprintf("%.2f s", 1e7 / st), 1e7 / st < 3);
        row("RSS, the replica that seeded and ran every workload", "< 64 MiB", rss " MiB", rss < 64);
        row("Seeding through ImportOptOuts", ">= 300,000/s", seed "/s", seed >= 300000);
        row("Filter bits per opt-out", "<= 16", sprintf("%.2f", bits / n), bits / n <= 16);
        row("p99 at half the peak, batch: service / echo", "(ratio)", sprintf("%s / %s us", sbp, ebp), -1);
        row("p99 at half the peak, single: service / echo", "(ratio)", sprintf("%s / %s us", ssp, esp), -1);
    }'
)
# The cores Redis and the client alone would use, at their measured cost per number in the
# service's runs, if the service answered at the target share of the echo's rate.
cores_at_target() { # workload share echo-pattern
    local e r c
    e=$(nps "$3")
    r=$(grep "^$1 " "$cpu" | awk '{print $4}' | median)
    c=$(grep "^$1 " "$cpu" | awk '{print $5}' | median)
    awk -v e="$e" -v x="$2" -v r="$r" -v c="$c" 'BEGIN {printf "%.2f", e * x * (r + c) / 1e9}'
}
cores_batch=$(cores_at_target "service batch" 0.70 '^echo +batch +batch +1000 conc +16')
cores_single=$(cores_at_target "service single" 0.90 '^echo +single batch +1 conc +64')
redis_mem=$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')

# A second replica: time to SERVING from the snapshot the first one published.
sleep 3
second="127.0.0.1:$((${SERVICE_PORT:-50251} + 10))"
t0=$(date +%s.%N)
OPTOUT_LOG=info "$bin/optout" serve --listen "$second" --redis-url "$redis_url" --rate-limit 0 \
    --filter-capacity "$COUNT" 2>"$work/second.log" &
pids+=($!)
until "$bin/optout" admin --server "http://$second" status 2>/dev/null | grep -q "fresh,"; do sleep 0.02; done
t1=$(date +%s.%N)
serving=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b-a}')
second_from=$(grep -o 'from="[a-z]*"' "$work/second.log" | head -1 || true)
second_pid=$(pgrep -f -- "--listen $second" | head -1)
second_rss_loaded=$(awk '/^VmRSS:/ {print $2}' "/proc/$second_pid/status")
# The second replica under the batch workload: memory of a replica that serves but did not import.
DURATION=5 run service "http://$second" --mode batch --batch 1000 --concurrency 16 --connections 4 \
    >/dev/null
second_rss_loaded_run=$(awk '/^VmRSS:/ {print $2}' "/proc/$second_pid/status")

{
    echo "# Benchmarks"
    echo
    echo "Written by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD),"
    echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), client and"
    echo "server sharing the machine; Redis $(redis-server --version | awk '{print $3}' | cut -d= -f2),"
    echo "$COUNT opt-outs, 5% opted-out traffic, $SECONDS_EACH s per workload after 2 s warm-up."
    if [ "$COVERAGE" = population ]; then
        echo "Population mode: seeded by a national check round trip of the opt-outs and $POOL"
        echo "clean numbers; every check of a released number asks the population set."
    fi
    echo
    echo "## Targets"
    echo
    echo "Ratios: the median of $RUNS runs of each workload, service and echo alternating (each run's own ratio,"
    echo "service over the echo run after it, in brackets: this machine is shared and noisy)."
    echo
    echo "| what | target | measured | met |"
    echo "|---|---|---|---|"
    echo "$targets"
    echo
    echo "The filter's measured false-positive rate (numbers never inserted) is measured by"
    echo "\`cargo bench --bench filter_choice\` (docs/src/performance.md, \"Which bloom filter\"); the status below gives the"
    echo "estimate from its fill."
    echo
    echo "## CPU per number checked"
    echo
    echo "Nanoseconds of CPU (user + system) per number checked, the median of the alternating runs"
    echo "after the first ($((RUNS - 1))): the server's (service or echo), Redis's and the load client's. The"
    echo "machine has $(nproc) cores for all three: a rate costs (server + Redis + client) x rate of them."
    echo
    echo "| workload | server | Redis | client |"
    echo "|---|---|---|---|"
    echo "$cpu_rows"
    echo
    echo "At 0.70 of the echo's batch rate, Redis and the client alone would use $cores_batch cores at"
    echo "these costs, before the service's own; at 0.90 of its single-number rate, $cores_single."
    echo
    echo "## Seeding"
    echo
    echo "    $seed_out"
    echo
    echo "## Workloads (numbers/s, requests/s, latency in microseconds)"
    echo
    echo '```'
    cat "$results"
    echo '```'
    echo
    echo "## Service"
    echo
    echo "- resident memory with $COUNT opt-outs, the replica that applied the seed import and ran"
    echo "  every workload: $((rss_kb / 1024)) MiB"
    echo "- resident memory of a second replica (loaded from the snapshot, imported nothing): at"
    echo "  SERVING $((second_rss_loaded / 1024)) MiB, after 5 s of the batch workload $((second_rss_loaded_run / 1024)) MiB"
    echo "- Redis used_memory: $base_mem -> $redis_mem bytes (includes the baseline set and the seed's log entry)"
    echo "- second replica to SERVING: $serving s ($second_from)"
    echo
    echo "## Independent client (h2load)"
    echo
    printf '%s\n' "${h2load_lines[@]}"
    echo
    echo "## Audit during the batch workload ($SECONDS_EACH s, 2 s warm-up included)"
    echo
    awk -v m0="$mem_before" -v m1="$mem_after" -v l0="${log_before:-0}" -v l1="${log_after:-0}" \
        -v n="$batch_numbers" -v s="$batch_seconds" 'BEGIN {
        total = n * (s + 2) / s;
        printf "- Redis used_memory: %+.1f MiB (checks are recorded on disk, not in Redis)\n", (m1 - m0) / 1048576;
        printf "- check log written: %.1f MiB, %.1f bytes per checked number, %.1f MB/s, %.0f GB an hour at this rate\n",
            (l1 - l0) / 1048576, (l1 - l0) / total, (l1 - l0) / (s + 2) / 1e6, (l1 - l0) / (s + 2) * 3600 / 1e9;
    }'

    echo
    echo '```'
    echo "$status"
    echo '```'
} >"$OUT"
[ -n "$soak_section" ] && printf '\n%s\n' "$soak_section" >>"$OUT"
"$bin/optout-loadtest" report --out "$REPORT" "$work"/*.json
echo "wrote $REPORT"
echo "wrote $OUT"
