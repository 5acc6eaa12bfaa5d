#!/usr/bin/env bash
# The gateway against uWebSockets (Bun's built-in server, tests/bench/bun-peer.js), same
# scenarios, same sitting: for each scenario, the gateway and Bun run interleaved (gateway, Bun,
# gateway, Bun, … for ROUNDS rounds), each run on a fresh cluster of 2 nodes and one
# redis-server (tests/bench/scenario.sh), loopback only. Prints one table at the end; read the
# ratios between the two targets, not the absolute figures, on a shared machine.
#
#   tests/bench/compare.sh [SCENARIO…]      SCENARIO: broadcast fan-out burst idle (default: all)
#
# Environment:
#   ROUNDS=1                    gateway/Bun pairs per scenario
#   BUN=<path>                  a bun binary to use instead of installing one
#   BUN_CACHE=<dir>             where Bun 1.4.4 is installed with npm when BUN is not given
#                               (default ${XDG_CACHE_HOME:-~/.cache}/pushgate-bench/bun-1.4.4;
#                               never inside the repository, never from CI)
#   KEEP=<dir>                  also keep each run's loadgen JSON there (SCENARIO.ROUND.TARGET.json)
#   BASE=<checkout>             also run another checkout's gateway (e.g. a worktree of main,
#                               built there first), interleaved as a third target, "base"
#   WRITE_FLOOR_C=<file.c>      the one-write floor program (CONNECTIONS MESSAGES
#                               FRAMES_PER_WRITE); when given and cc exists, it is built in a
#                               temporary directory and `2000 400000 1` runs after the scenarios
#
# Build first: cargo build --release -p tests --bin loadgen --bin gateway-node
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rounds=${ROUNDS:-1}
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(broadcast fan-out burst idle)

if [ -z "${BUN:-}" ]; then
  cache=${BUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pushgate-bench/bun-1.4.4}
  BUN=$cache/node_modules/@oven/bun-linux-x64/bin/bun
  if [ ! -x "$BUN" ]; then
    echo "compare: installing Bun 1.4.4 into $cache" >&2
    mkdir -p "$cache"
    npm install --prefix "$cache" --no-save --no-audit --no-fund @oven/bun-linux-x64@1.4.4 >&2
  fi
fi
export BUN
echo "compare: bun $("$BUN" --version) at $BUN" >&2

args_of() {
  case $1 in
    broadcast) echo "--connections 2000 --channels 1 --rate 100 --duration 10 --payload 100" ;;
    fan-out) echo "--connections 2000 --channels 20 --rate 2000 --duration 10 --payload 100" ;;
    burst) echo "--connections 500 --channels 1 --rate 2000 --duration 5 --payload 100" ;;
    idle) echo "--connections 10000 --channels 1 --rate 0 --settle 3" ;;
    *) echo "unknown scenario $1 (broadcast fan-out burst idle)" >&2; return 1 ;;
  esac
}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for scenario in "${scenarios[@]}"; do
  args=$(args_of "$scenario")
  for round in $(seq 1 "$rounds"); do
    for target in gateway bun ${BASE:+base}; do
      echo "compare: $scenario, round $round, $target: scenario.sh 2 $args" >&2
      script=$here/scenario.sh
      [ "$target" = base ] && script=$BASE/tests/bench/scenario.sh
      # shellcheck disable=SC2086 # the arguments are meant to split
      TARGET=${target/base/gateway} "$script" 2 $args --json >"$out/$scenario.$round.$target.json"
    done
  done
done

floor=""
# The one-write floor of the same sitting (tests/bench/write_floor.c unless WRITE_FLOOR_C).
WRITE_FLOOR_C=${WRITE_FLOOR_C:-$here/write_floor.c}
if [ -f "$WRITE_FLOOR_C" ] && command -v cc >/dev/null; then
  cc -O2 -o "$out/write_floor" "$WRITE_FLOOR_C"
  floor=$("$out/write_floor" 2000 400000 1)
fi

if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$out"/*.json "$KEEP"/; fi

python3 - "$out" "$rounds" "${BASE:+base}" "${scenarios[@]}" <<'EOF'
import json, sys
out, rounds, base, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
targets = ("gateway", "bun") + ((base,) if base else ())
print("| scenario | round | target | CPU-s (2 nodes) | CPU µs per delivery | p50 ms | p99 ms | lost | RSS per idle conn |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for s in scenarios:
    for r in range(1, rounds + 1):
        for t in targets:
            j = json.load(open(f"{out}/{s}.{r}.{t}.json"))
            g, d = j["gateways"], j["deliveries"]
            name = {"bun": "Bun 1.4.4", "base": "base"}.get(t, "gateway")
            if s == "idle":
                print(f"| {s} | {r} | {name} | | | | | | {g['rss_per_connection_bytes'] / 1024:.1f} KiB "
                      f"({j['connections']['made']} made) |")
                continue
            cpu = g["cpu_secs_total"]
            per = cpu * 1e6 / d["received"] if d["received"] else float("nan")
            print(f"| {s} | {r} | {name} | {cpu:.2f} | {per:.2f} | {j['latency_ms']['p50']:.1f} | {j['latency_ms']['p99']:.1f} | "
                  f"{d['lost']} of {d['expected']} | |")
EOF
[ -z "$floor" ] || echo "write floor (2000 sockets, 400000 writes, 1 frame per write): $floor"
