#!/usr/bin/env bash
# Run one load scenario against a fresh local cluster (release build, loopback only):
# a redis-server, NODES gateway processes, then loadgen with the remaining arguments.
#
#   tests/bench/scenario.sh NODES [loadgen args…]
#   tests/bench/scenario.sh 2 --connections 2000 --channels 20 --rate 2000 --duration 10 --payload 100
#
# Build first: cargo build --release -p tests --bin loadgen --bin gateway-node
# Extra gateway settings come from the environment (GATEWAY__…), e.g.
#   GATEWAY__LIMITS__SEND_QUEUE_BYTES=262144 tests/bench/scenario.sh 1 …
set -euo pipefail
# 20,000 connections need more descriptors than the usual default (root may raise it).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cd "$(dirname "$0")/../.."
nodes=$1; shift
bin=target/release
[ -x "$bin/gateway-node" ] && [ -x "$bin/loadgen" ] || {
  echo "build first: cargo build --release -p tests --bin loadgen --bin gateway-node" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --loglevel warning >"$dir/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done

urls=(); gw_pids=()
for i in $(seq 1 "$nodes"); do
  port=$(free_port); admin=$(free_port)
  GATEWAY__REDIS__URL="redis://127.0.0.1:$redis_port" GATEWAY__LISTEN="127.0.0.1:$port" \
  GATEWAY__ADMIN_LISTEN="127.0.0.1:$admin" GATEWAY__NODE_NAME="gw-$i" RUST_LOG=warn \
    "$bin/gateway-node" >"$dir/gw-$i.log" 2>&1 &
  pids+=($!); gw_pids+=($!)
  until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; do sleep 0.05; done
  urls+=("ws://127.0.0.1:$port/ws")
done

"$bin/loadgen" --redis "redis://127.0.0.1:$redis_port" \
  --url "$(IFS=,; echo "${urls[*]}")" --pids "$(IFS=,; echo "${gw_pids[*]}")" "$@"
