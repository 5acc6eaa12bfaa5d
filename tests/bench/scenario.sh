#!/usr/bin/env bash
# Run one load scenario against a fresh local cluster (release build, loopback only):
# a redis-server, NODES gateway processes, then loadgen with the remaining arguments.
#
#   tests/bench/scenario.sh NODES [loadgen args…]
#   tests/bench/scenario.sh 2 --connections 2000 --channels 20 --rate 2000 --duration 10 --payload 100
#
# Build first: cargo build --release -p tests --bin loadgen --bin gateway-node
# REDIS_CLUSTER=1 runs the bus on a 3-primary Redis Cluster instead of one redis-server.
# TARGET=bun BUN=<path to bun> runs NODES copies of the comparison peer tests/bench/bun-peer.js
# instead of gateway nodes (one redis-server only); tests/bench/compare.sh does that for you.
# Extra gateway settings come from the environment (GATEWAY__…), e.g.
#   GATEWAY__LIMITS__SEND_QUEUE_BYTES=262144 tests/bench/scenario.sh 1 …
set -euo pipefail
# 20,000 connections need more descriptors than the usual default (root may raise it).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cd "$(dirname "$0")/../.."
nodes=$1; shift
bin=target/release
target=${TARGET:-gateway}
[ -x "$bin/gateway-node" ] && [ -x "$bin/loadgen" ] || {
  echo "build first: cargo build --release -p tests --bin loadgen --bin gateway-node" >&2; exit 1; }
case $target in
  gateway) ;;
  bun) [ -x "${BUN:-}" ] || { echo "TARGET=bun needs BUN=<path to the bun binary>" >&2; exit 1; }
       [ "${REDIS_CLUSTER:-0}" = 1 ] && { echo "the Bun peer has no cluster mode" >&2; exit 1; } ;;
  *) echo "TARGET is gateway or bun, not $target" >&2; exit 1 ;;
esac

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

start_redis() { # port [more redis-server arguments…]
  local port=$1; shift
  mkdir -p "$dir/redis-$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir/redis-$port" \
    --loglevel warning "$@" >"$dir/redis-$port.log" 2>&1 &
  pids+=($!)
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

if [ "${REDIS_CLUSTER:-0}" = 1 ]; then
  # REDIS_CLUSTER=1: a Redis Cluster of 3 primaries (no replicas: the bus's own cost), the
  # gateways in cluster mode, the load generator publishing with SPUBLISH.
  seeds=(); addrs=()
  for _ in 1 2 3; do
    p=$(free_port)
    start_redis "$p" --cluster-enabled yes --cluster-port "$(free_port)"
    seeds+=("redis://127.0.0.1:$p"); addrs+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-yes >/dev/null
  until redis-cli -p "${addrs[0]#*:}" cluster info | grep -q 'cluster_state:ok'; do sleep 0.1; done
  redis_env=(GATEWAY__REDIS__CLUSTER_NODES="$(IFS=,; echo "${seeds[*]}")")
  loadgen_redis=(--cluster --redis "$(IFS=,; echo "${seeds[*]}")")
else
  redis_port=$(free_port)
  start_redis "$redis_port"
  redis_env=(GATEWAY__REDIS__URL="redis://127.0.0.1:$redis_port")
  loadgen_redis=(--redis "redis://127.0.0.1:$redis_port")
fi

urls=(); gw_pids=()
for i in $(seq 1 "$nodes"); do
  port=$(free_port); admin=$(free_port)
  if [ "$target" = bun ]; then
    "$BUN" tests/bench/bun-peer.js --listen "127.0.0.1:$port" --redis "redis://127.0.0.1:$redis_port" \
      >"$dir/bun-$i.log" 2>&1 &
    pids+=($!); gw_pids+=($!)
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
      kill -0 "$!" 2>/dev/null || { cat "$dir/bun-$i.log" >&2; exit 1; }; sleep 0.05; done
    urls+=("ws://127.0.0.1:$port/ws")
    continue
  fi
  env "${redis_env[@]}" GATEWAY__LISTEN="127.0.0.1:$port" \
  GATEWAY__ADMIN_LISTEN="127.0.0.1:$admin" GATEWAY__NODE_NAME="gw-$i" RUST_LOG=warn \
    "$bin/gateway-node" >"$dir/gw-$i.log" 2>&1 &
  pids+=($!); gw_pids+=($!)
  until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; do sleep 0.05; done
  urls+=("ws://127.0.0.1:$port/ws")
done

"$bin/loadgen" "${loadgen_redis[@]}" \
  --url "$(IFS=,; echo "${urls[*]}")" --pids "$(IFS=,; echo "${gw_pids[*]}")" "$@"
