# Shared by the bench scripts (sourced, not run): a scratch directory and the processes started,
# both cleaned up on exit; the release binaries built; redis-server required.
#
#   source "$(dirname "$0")/bench-lib.sh"   # then: "$bin/optout", "$work", pids+=($!)

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --locked -p optout --bin optout >/dev/null
cargo build --release --locked -p optout-loadtest --bin optout-loadtest >/dev/null
bin=target/release
command -v redis-server >/dev/null || {
    echo "redis-server is missing: bash scripts/test.sh installs it" >&2
    exit 1
}

# Requests per second an independent client (h2load, Debian's nghttp2-client) gets posting one
# pre-framed Check request (written by `optout-loadtest frame`) as fast as the server answers.
h2load_rps() { # address body requests connections streams-per-connection
    h2load -n "$3" -c "$4" -m "$5" -H 'content-type: application/grpc' -H 'te: trailers' \
        -d "$2" "http://$1/optout.v1.OptOutCheck/Check" 2>&1 \
        | awk '/^finished in/ {for (i = 1; i <= NF; i++) if ($(i) ~ /req\/s/) {gsub(",", "", $(i-1)); print $(i-1)}}'
}

# The median of the numbers on stdin, one a line (of an even count, the mean of the middle two,
# not the lower: bench-ab.sh's four rounds would otherwise report their second best).
median() {
    sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else if (NR) print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# A process's CPU so far: its user + system ticks from /proc; and those of the children it has
# reaped (a shell's: the clients it ran, through any command substitution once that is reaped).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
child_ticks() { awk '{print $16 + $17}' "/proc/$1/stat"; }
# Resident memory of a process now, and its peak so far, in MiB.
rss() { awk '/^VmRSS:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
# name port: a Redis with the persistence the service requires, initialised; its pid in $name_redis.
redis_store() {
    mkdir -p "$work/$1"
    redis-server --port "$2" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
        --dir "$work/$1" --logfile "$work/$1/redis.log" --daemonize no &
    pids+=($!)
    eval "${1}_redis=$!"
    until redis-cli -p "$2" ping >/dev/null 2>&1; do sleep 0.1; done
    "$bin/optout" init-store --redis-url "redis://127.0.0.1:$2" --national-coverage list >/dev/null
}
# Until the service at an address answers.
until_up() { until "$bin/optout" admin --server "$1" status >/dev/null 2>&1; do sleep 0.2; done; }

# Until a replica's filter reflects the store (the store's version, and fresh), a "maybe" finds
# the store ahead of the filter and the check asks the store about every number of the batch: a
# workload would measure that catching-up.
caught_up() { # server
    "$bin/optout" admin --server "$1" status 2>/dev/null | awk '
        /^version:/ {v = $2} /^filter version:/ {f = $3; fresh = ($4 == "(fresh,")}
        END {exit !(v != "" && v == f && fresh)}'
}
wait_caught_up() { # server
    for ((i = 0; i < 600; i++)); do caught_up "$1" && return; sleep 0.1; done
    echo "warning: $1's filter did not catch up with the store within 60 s" >&2
}
