#!/usr/bin/env bash
# Soak a fresh local cluster (loopback only) for DURATION and fail on any broken promise:
# a redis-server with AOF that is started again whenever it dies, 2 gateway nodes, 2 publisher
# replicas, then the `soak` client (tests/src/bin/soak) with the remaining arguments. It
# publishes with history, churns connections and subscriptions, stalls slow readers until they
# are cut off (4000), SIGKILLs Redis periodically, samples RSS, descriptors, gauges and Redis's
# subscriptions, and checks every message; see RELIABILITY.md.
#
#   tests/bench/soak.sh DURATION [soak args…]      DURATION: 60, 90s, 30m, 1h
#   tests/bench/soak.sh 30m
#   SOAK_PROFILE=debug tests/bench/soak.sh 60       # what CI runs, on the debug binaries
#
# Build first: cargo build --release -p tests --bin soak --bin gateway-node --bin publisher-node
# (SOAK_PROFILE=debug: the same without --release; `cargo test -p tests` builds them too.)
# Extra gateway settings come from the environment (GATEWAY__…). SOAK_REDIS_DOWN_SECS (1) is
# how long Redis stays down after each kill; SOAK_REDIS_ARGS adds redis-server arguments
# (`--appendonly no` shows the soak failing as it should: restarts then lose history).
# Logs are kept in SOAK_LOGS when it is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
duration=$1; shift
case $duration in
  *h) secs=$(( ${duration%h} * 3600 )) ;;
  *m) secs=$(( ${duration%m} * 60 )) ;;
  *s) secs=${duration%s} ;;
  *) secs=$duration ;;
esac
profile=${SOAK_PROFILE:-release}
bin=target/$profile
for b in soak gateway-node publisher-node; do
  [ -x "$bin/$b" ] || {
    flag=$([ "$profile" = release ] && echo ' --release' || true)
    echo "build first: cargo build$flag -p tests --bin soak --bin gateway-node --bin publisher-node" >&2
    exit 1
  }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
logs=${SOAK_LOGS:-$dir}
mkdir -p "$logs" "$dir/redis"
pids=()
status=1
cleanup() {
  rm -f "$dir/redis.run"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$dir/redis.pid" ] && kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "$status" -ne 0 ] && [ "$logs" = "$dir" ]; then
    for f in "$dir"/*.log; do echo "--- last lines of $(basename "$f")"; tail -n 20 "$f"; done >&2
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

# Redis under a supervisor loop, as systemd or Kubernetes would restart it: the soak SIGKILLs
# it, the loop starts it again on the same port and AOF directory.
redis_port=$(free_port)
touch "$dir/redis.run"
(
  while [ -e "$dir/redis.run" ]; do
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly yes \
      --appendfsync everysec --dir "$dir/redis" --loglevel warning ${SOAK_REDIS_ARGS:-} \
      >>"$logs/redis.log" 2>&1 &
    echo $! >"$dir/redis.pid"
    wait $! || true
    [ -e "$dir/redis.run" ] && sleep "${SOAK_REDIS_DOWN_SECS:-1}"
  done
) 2>>"$logs/redis.log" &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
redis_url="redis://127.0.0.1:$redis_port"

urls=(); admins=()
for i in 1 2; do
  port=$(free_port); admin=$(free_port)
  GATEWAY__REDIS__URL="$redis_url" GATEWAY__LISTEN="127.0.0.1:$port" \
  GATEWAY__ADMIN_LISTEN="127.0.0.1:$admin" GATEWAY__NODE_NAME="gw-$i" \
  GATEWAY__LIMITS__SEND_QUEUE_BYTES="${GATEWAY__LIMITS__SEND_QUEUE_BYTES:-262144}" \
  RUST_LOG=warn "$bin/gateway-node" >"$logs/gw-$i.log" 2>&1 &
  pids+=($!)
  urls+=("ws://127.0.0.1:$port/ws"); admins+=("127.0.0.1:$admin")
done
publishers=()
for i in 1 2; do
  port=$(free_port)
  PUBLISHER__REDIS__URL="$redis_url" PUBLISHER__LISTEN="127.0.0.1:$port" \
  RUST_LOG=warn "$bin/publisher-node" run >"$logs/publisher-$i.log" 2>&1 &
  pids+=($!)
  publishers+=("127.0.0.1:$port")
done

join() { local IFS=,; echo "$*"; }
set +e
"$bin/soak" --duration "$secs" --redis "$redis_url" --nodes "$(join "${urls[@]}")" \
  --admin "$(join "${admins[@]}")" --publishers "$(join "${publishers[@]}")" "$@"
status=$?
set -e
exit "$status"
