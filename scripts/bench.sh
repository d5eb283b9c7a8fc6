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
EMBEDDED="127.0.0.1:${EMBEDDED_PORT:-50253}"
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
# The embedded store (no Redis), with the same settings: issue 31 holds its CPU per number to the
# Redis topology's. List mode only (its population set would need a second national check).
embedded=""
if [ "$COVERAGE" = list ]; then
    OPTOUT_LOG=warn "$bin/optout" serve --listen "$EMBEDDED" --data-dir "$work/embedded" \
        --rate-limit 0 --filter-capacity "$COUNT" --snapshot-interval-secs 2 \
        --max-message-bytes 67108864 --check-log-dir "$work/check-log-embedded" 2>"$work/embedded.log" &
    embedded_pid=$!
    pids+=($embedded_pid)
    embedded="http://$EMBEDDED"
fi
for s in "http://$SERVICE" $embedded; do until_up "$s"; done

base_mem=$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
national_check=()
[ "$COVERAGE" = population ] && national_check=(--national-check)
seed_out=$("$bin/optout-loadtest" seed --server "http://$SERVICE" --count "$COUNT" "${pool[@]}" "${national_check[@]}" \
    --baseline-redis-url "$redis_url")
echo "$seed_out"
seed_hwm=$(hwm "$service_pid")
# The first workload, whose rates the half-peak runs below are taken from, must not measure the
# replica catching up with the seed.
wait_caught_up "http://$SERVICE"
emb_seed_out="" emb_seed_hwm=""
if [ -n "$embedded" ]; then
    emb_seed_out=$("$bin/optout-loadtest" seed --server "$embedded" --count "$COUNT" "${pool[@]}")
    echo "embedded: $emb_seed_out"
    emb_seed_hwm=$(hwm "$embedded_pid")
    wait_caught_up "$embedded"
fi

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
for ((i = 1; i <= RUNS; i++)); do
    run_cpu service "$service_pid" batch "http://$SERVICE" --batch 1000 --concurrency 16 --connections 4
    run_cpu echo "$echo_pid" batch "http://$ECHO" --batch 1000 --concurrency 16 --connections 4 --no-leak-check
    [ -n "$embedded" ] && run_cpu embedded "$embedded_pid" batch "$embedded" --batch 1000 \
        --concurrency 16 --connections 4
    run_cpu service "$service_pid" single "http://$SERVICE" --concurrency 64 --connections 4
    run_cpu echo "$echo_pid" single "http://$ECHO" --concurrency 64 --connections 4 --no-leak-check
done | tee -a "$results"
# The median CPU of each of the four workloads, in ns per number checked (a single-number
# request is one number).
cpu_of() { grep "^$1 " "$cpu" | awk -v k="$2" '{print $k}' | median; } # workload column(3 server, 4 Redis, 5 client)
cpu_rows=$(for w in "service batch" "echo batch" "embedded batch" "service single" "echo single"; do
    if [ -n "$(cpu_of "$w" 3)" ]; then
        printf '| %s | %s | %s | %s |\n' "$w" "$(cpu_of "$w" 3)" "$(cpu_of "$w" 4)" "$(cpu_of "$w" 5)"
    fi
done)
# Each run's ratio of server CPU, the first workload's over the second's of the same round.
# Each line's first column over its second, as "a, b, c".
ratios() { awk '{printf "%s%.2f", (NR > 1 ? ", " : ""), $1 / $2}'; }
cpu_pairs() {
    paste <(grep "^$1 " "$cpu" | awk '{print $3}') <(grep "^$2 " "$cpu" | awk '{print $3}') | ratios
}
emb_rss_run=""
[ -n "$embedded" ] && emb_rss_run=$(rss "$embedded_pid") && emb_hwm_run=$(hwm "$embedded_pid")

peak_batch=$(grep -E '^service +batch' "$results" | head -1 | awk '{for(i=1;i<=NF;i++) if($i=="req/s") print $(i-1)}')
peak_single=$(grep -E '^service +single' "$results" | head -1 | awk '{for(i=1;i<=NF;i++) if($i=="req/s") print $(i-1)}')
half_batch=$(awk -v r="$peak_batch" 'BEGIN {printf "%.0f", r/2}')
half_single=$(awk -v r="$peak_single" 'BEGIN {printf "%.0f", r/2}')
# p99 at half the peak, service and echo alternating, RUNS rounds: one run on a shared machine
# can be off by several times (a scheduler stall lands in one run's tail), so the targets take the
# median of each and show every round's ratio.
{
    for ((i = 1; i <= RUNS; i++)); do
        run service "http://$SERVICE" --mode batch --batch 1000 --concurrency 64 --connections 4 \
            --rate "$half_batch"
        # The echo server at the same rates: its p99 is the transport's at that load.
        run echo "http://$ECHO" --mode batch --batch 1000 --concurrency 64 --connections 4 \
            --rate "$half_batch" --no-leak-check
        run service "http://$SERVICE" --mode single --concurrency 128 --connections 4 \
            --rate "$half_single"
        run echo "http://$ECHO" --mode single --concurrency 128 --connections 4 \
            --rate "$half_single" --no-leak-check
    done
    # CheckStream: 10 million numbers (1,000 messages of 10,000) end to end, no warm-up.
    DURATION=120 run service "http://$SERVICE" --mode stream --batch 10000 --concurrency 1 \
        --connections 1 --count-requests 1000 --warmup 0
} | tee -a "$results"

# The same floors through an independent client: h2load posting one pre-framed request, so a
# slow harness cannot pass for a fast server (the same request every time: a best case for caches).
h2load_lines=()
declare -A h2_ratio=()
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
        h2_ratio[$batch]=$(awk -v s="$s" -v e="$e" 'BEGIN {printf "%.2f", s / e}')
        h2load_lines+=("$(awk -v b="$batch" -v s="$s" -v e="$e" 'BEGIN {
            printf "- Check of %d numbers, 4 connections x 16 streams, median of '"$RUNS"': service %.0f req/s (%.0f numbers/s), echo %.0f req/s, ratio %.2f", b, s, s * b, e, s / e }')")
    done
else
    h2load_lines+=("- not measured: h2load is missing (apt-get install nghttp2-client)")
fi

rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$service_pid/status")
status=$("$bin/optout" admin --server "http://$SERVICE" status)

# The targets of issue 31 (what the service spends, against the echo server doing no work), and
# those of issue 15 still held, from the lines above: (label, target, measured, met).
# The median over the matching lines (every run of a workload).
nps() {
    grep -E "$1" "$results" | awk '{for (i = 2; i <= NF; i++) if ($(i) == "numbers/s") print $(i-1)}' | median
}
# Each run's p99 (us) of the lines matching $1, in order; p99 takes their median.
p99s() { grep -E "$1" "$results" | awk '{for (i = 1; i <= NF; i++) if ($(i) == "p99") {print $(i+1); break}}'; }
p99() { p99s "$1" | median; }
# Each round's ratio of p99s, the first pattern's over the second's.
p99_pairs() { paste <(p99s "$1") <(p99s "$2") | ratios; }
# Bytes of check log per checked number in the first batch workload (its warm-up counted).
log_per_number=$(awk -v l0="${log_before:-0}" -v l1="${log_after:-0}" -v n="$batch_numbers" -v s="$batch_seconds" \
    'BEGIN {printf "%.1f", (l1 - l0) / (n * (s + 2) / s)}')
# Opted-out numbers released, over every run but the echo's (which answers RELEASE to all).
leaks=$(grep -Ev '^echo' "$results" | awk '{for (i = 1; i < NF; i++) if ($(i) == "leaks") t += $(i+1)} END {print t + 0}')
# The share of numbers the filter calls "maybe" (those Redis is asked about): the planted share
# and the false positives among the rest.
fp=$(awk '/^false-positive rate:/ {for (i = 1; i <= NF; i++) if ($(i) == "estimated") {gsub("%", "", $(i+1)); print $(i+1) / 100}}' <<<"$status")
targets=$(
    sc=$(cpu_of "service batch" 3); ec=$(cpu_of "echo batch" 3); emc=$(cpu_of "embedded batch" 3)
    s1=$(cpu_of "service single" 3); e1=$(cpu_of "echo single" 3)
    rc=$(cpu_of "service batch" 4)
    st=$(nps '^service +stream')
    sbp=$(p99 '^service +batch .*rate'); ebp=$(p99 '^echo +batch .*rate')
    ssp=$(p99 '^service +single .*rate'); esp=$(p99 '^echo +single .*rate')
    seed_rate=$(grep -o '([0-9]*/s)' <<<"$seed_out" | tr -dc '0-9')
    emb_seed_rate=$(grep -o '([0-9]*/s)' <<<"$emb_seed_out" | tr -dc '0-9')
    bits=$(awk '/^filter:/ {for (i = 1; i <= NF; i++) if ($(i) == "bits,") print $(i-1)}' <<<"$status")
    awk -v sc="$sc" -v ec="$ec" -v emc="$emc" -v s1="$s1" -v e1="$e1" -v rc="$rc" -v fp="$fp" \
        -v rb="$(cpu_pairs "service batch" "echo batch")" -v r1="$(cpu_pairs "service single" "echo single")" \
        -v remb="$(cpu_pairs "embedded batch" "service batch")" -v h2="${h2_ratio[1]:-}" \
        -v pb="$(p99_pairs '^service +batch .*rate' '^echo +batch .*rate')" \
        -v p1="$(p99_pairs '^service +single .*rate' '^echo +single .*rate')" \
        -v st="$st" -v rss="$((rss_kb / 1024))" -v seed="$seed_rate" -v seed_hwm="$seed_hwm" \
        -v eseed="$emb_seed_rate" -v eseed_hwm="$emb_seed_hwm" -v erss="$emb_rss_run" -v ehwm="${emb_hwm_run:-}" \
        -v bits="$bits" -v n="$COUNT" -v sbp="$sbp" -v ebp="$ebp" -v ssp="$ssp" -v esp="$esp" \
        -v logb="$log_per_number" -v leaks="$leaks" -v runs="$RUNS" 'function row(what, target, got, met) {
            printf "| %s | %s | %s | %s |\n", what, target, got, met < 0 ? "not measured" : met ? "yes" : "no" }
        BEGIN {
        row("Server CPU per number, batches of 1,000: service / echo", "<= 2.5x",
            sprintf("%.1f / %.1f ns = %.2fx (runs: %s)", sc, ec, sc / ec, rb), sc / ec <= 2.5);
        row("Server CPU per number, single-number requests: service / echo", "<= 1.15x",
            sprintf("%.0f / %.0f ns = %.2fx (runs: %s)", s1, e1, s1 / e1, r1), s1 / e1 <= 1.15);
        row("Single-number throughput / echo (h2load, median of " runs ")", ">= 0.90",
            h2 == "" ? "h2load missing" : h2, h2 == "" ? -1 : h2 >= 0.9);
        maybe = 0.05 + 0.95 * fp;
        row("Redis CPU per maybe, batches (" sprintf("%.2f%%", 100 * maybe) " of numbers)", "<= 1 us",
            sprintf("%.2f us (%.1f ns a number)", rc / maybe / 1000, rc), rc / maybe <= 1000);
        row("Embedded store: server CPU per number, batches / the Redis topology", "<= 1.5x",
            emc == "" ? "list mode only" : sprintf("%.1f / %.1f ns = %.2fx (runs: %s)", emc, sc, emc / sc, remb),
            emc == "" ? -1 : emc / sc <= 1.5);
        row("Embedded store: RSS after the batch workload (peak so far)", "< 64 MiB",
            erss == "" ? "list mode only" : sprintf("%s MiB (%s)", erss, ehwm), erss == "" ? -1 : ehwm < 64);
        row("Check log on disk per checked number", "<= 6 bytes", logb " bytes", logb <= 6);
        row("p99 at half the peak, batches: service / echo (median of " runs ")", "<= 2x",
            sprintf("%s / %s us = %.2fx (runs: %s)", sbp, ebp, sbp / ebp, pb), sbp / ebp <= 2);
        row("p99 at half the peak, single numbers: service / echo (median of " runs ")", "<= 2x",
            sprintf("%s / %s us = %.2fx (runs: %s)", ssp, esp, ssp / esp, p1), ssp / esp <= 2);
        row("Seeding through ImportOptOuts, Redis (replica peak RSS)", ">= 500,000/s, < 64 MiB",
            sprintf("%s/s (%s MiB)", seed, seed_hwm), seed >= 500000 && seed_hwm < 64);
        row("Seeding through ImportOptOuts, embedded (peak RSS)", ">= 300,000/s, < 64 MiB",
            eseed == "" ? "list mode only" : sprintf("%s/s (%s MiB)", eseed, eseed_hwm),
            eseed == "" ? -1 : eseed >= 300000 && eseed_hwm < 64);
        row("Opted-out numbers released, every run", "0", leaks, leaks == 0);
        row("CheckStream, 10 M numbers", "< 3 s", sprintf("%.2f s", 1e7 / st), 1e7 / st < 3);
        row("RSS, the Redis replica that seeded and ran every workload", "< 64 MiB", rss " MiB", rss < 64);
        row("Filter bits per opt-out (issue 15; the blocked filter trades for speed)", "<= 16",
            sprintf("%.2f", bits / n), bits / n <= 16);
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
    echo "CPU is what each process spent (user + system, from /proc) per number checked, the median of"
    echo "$RUNS alternating runs of each workload (service, echo, embedded); each round's own ratio in"
    echo "brackets, as this machine is shared and noisy. Throughput is not the measure: on $(nproc) cores"
    echo "shared by the client, Redis and the server, the others' CPU decides it (below)."
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
    echo "Nanoseconds of CPU (user + system) per number checked, the median of the $RUNS alternating"
    echo "runs: the server's (service, echo or embedded store), Redis's and the load client's. The"
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
    [ -n "$emb_seed_out" ] && echo "    embedded store: $emb_seed_out"
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
