# Shared by bench-topologies.sh and soak.sh (sourced, not run): a scratch directory and the
# processes started, stopped with `stop_all` and on exit; the release binaries built; Redis nodes
# and a Redis Cluster on loopback.
#
#   source "$(dirname "$0")/topology-lib.sh"   # then: node PORT DIR, cluster BASE DIR, "$bin/optout"

work="$(mktemp -d)"
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT

cargo build --release --locked -p optout --bin optout >/dev/null
cargo build --release --locked -p optout-loadtest --bin optout-loadtest >/dev/null
bin=target/release
for tool in redis-server redis-cli; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: bash scripts/test.sh installs it" >&2; exit 1; }
done

# One Redis node, persisting as the service requires (every acknowledged write fsynced).
node() { # port dir extra-args...
    local port=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly yes --appendfsync always \
        --repl-diskless-sync-delay 0 --logfile "$dir/redis.log" "$@" &
    pids+=($!)
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

# A Redis Cluster of 3 masters and 3 replicas on ports base..base+5, ready; sets `store` to the
# service's flags for it.
cluster() { # base dir
    local base=$1 dir=$2 nodes=() i n
    for i in 0 1 2 3 4 5; do
        node $((base + i)) "$dir/n$i" --cluster-enabled yes --cluster-config-file nodes.conf \
            --cluster-node-timeout 2000
        nodes+=("127.0.0.1:$((base + i))")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
    for n in "${nodes[@]}"; do
        until redis-cli -p "${n##*:}" cluster info | grep -q 'cluster_state:ok'; do sleep 0.2; done
    done
    until [ "$(redis-cli -p "$base" cluster nodes | grep -c 'slave.*connected')" = 3 ]; do sleep 0.2; done
    sleep 1
    store=(--redis-cluster "$(IFS=,; echo "${nodes[*]:0:3}")")
}
