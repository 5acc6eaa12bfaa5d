#!/usr/bin/env bash
# What presence costs Redis and the node (BENCHMARKS.md "Presence"): a fresh redis-server and
# one release gateway, N idle connections over K channels (`bench-0` … `bench-{K-1}`, all
# presence channels unless PRESENCE=off), then Redis's own command counters over a window of
# WINDOW seconds while nothing but presence happens, and loadgen's RSS per connection.
#
#   tests/bench/presence.sh CONNECTIONS CHANNELS [WINDOW]
#   PRESENCE=off tests/bench/presence.sh 10000 1      # the same without presence channels
#
# Build first: cargo build --release -p tests --bin loadgen --bin gateway-node
# Extra gateway settings come from the environment (GATEWAY__…), e.g.
#   GATEWAY__PRESENCE__JOIN_LEAVE=false tests/bench/presence.sh 10000 1
set -euo pipefail
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cd "$(dirname "$0")/../.."
conns=$1 channels=$2 window=${3:-30}
bin=target/release
[ -x "$bin/gateway-node" ] && [ -x "$bin/loadgen" ] || {
  echo "build first: cargo build --release -p tests --bin loadgen --bin gateway-node" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --loglevel warning >"$dir/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.05; done

if [ "${PRESENCE:-on}" = off ]; then presence='[]'; else presence='bench-*'; fi
port=$(free_port); admin=$(free_port)
GATEWAY__REDIS__URL="redis://127.0.0.1:$rport" GATEWAY__LISTEN="127.0.0.1:$port" \
GATEWAY__ADMIN_LISTEN="127.0.0.1:$admin" GATEWAY__NODE_NAME=gw-1 RUST_LOG=warn \
GATEWAY__PRESENCE_CHANNELS="$presence" "$bin/gateway-node" >"$dir/gw.log" 2>&1 &
gw=$!; pids+=($gw)
until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; do sleep 0.05; done

# Hold the connections for the window plus the time to open them.
"$bin/loadgen" --redis "redis://127.0.0.1:$rport" --url "ws://127.0.0.1:$port/ws" --pids "$gw" \
  --connections "$conns" --channels "$channels" --rate 0 --settle $((window + 15)) >"$dir/loadgen.out" 2>&1 &
lg=$!; pids+=($lg)

metric() { curl -sf "http://127.0.0.1:$admin/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
until [ "$(metric gateway_connections)" = "$conns" ]; do sleep 0.2; done
sleep 3 # let the joins be written
calls() { redis-cli -p "$rport" info commandstats | tr -d '\r' | awk -F'[:=,]' -v c="cmdstat_$1" '$1 == c { print $3 }'; }
total() { redis-cli -p "$rport" info stats | tr -d '\r' | awk -F: '$1 == "total_commands_processed" { print $2 }'; }
declare -A before
for c in evalsha eval zadd hset publish; do before[$c]=$(calls $c); done
t0=$(total); written0=$(metric gateway_presence_entries_written_total)
sleep "$window"
t1=$(total); written1=$(metric gateway_presence_entries_written_total)
echo "connections $conns, channels $channels, presence ${PRESENCE:-on}, window ${window}s"
echo "presence entries on the node: $(metric gateway_presence_entries)"
echo "commands/s from clients (total_commands_processed): $(( (t1 - t0) / window ))"
for c in evalsha eval zadd hset publish; do
  after=$(calls $c); echo "  $c/s: $(( (${after:-0} - ${before[$c]:-0}) / window ))"
done
echo "entries written/s: $(( (${written1%.*} - ${written0%.*}) / window ))"
wait "$lg" || true
grep -Ei 'rss|connect' "$dir/loadgen.out" || cat "$dir/loadgen.out"
