#!/usr/bin/env bash
# HTTP ingest throughput with wrk (Debian's `wrk`), on loopback: NDJSON batches of 1,000 events
# over keep-alive, and one event per request. Prints wrk's own summaries.
#   usage: benches/http/run.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-15}
cargo build --release -q
bin=target/release/transfer-guard
work=$(mktemp -d)
trap 'kill $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/config.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
state_dir = "$work/state"
max_body_bytes = 4194304
[[cbo]]
key = "bench"
ingest_token_env = "TOKEN"
TOML
export TOKEN=bench-token
"$bin" bench lines --events 200000 --per-file 1000 --dir "$work/batches"
"$bin" bench lines --events 2000 --per-file 1 --dir "$work/singles"
RUST_LOG=error "$bin" run --config "$work/config.toml" & echo $! > "$work/pid"
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
# CPU seconds the daemon has used so far (utime + stime), and wrk's own, to see who was busy.
daemon_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$(cat "$work/pid")/stat"; }
TIMEFORMAT='wrk used %U s user + %S s system over %R s'
run_wrk() {
  local before; before=$(daemon_cpu)
  time BODIES="$1" wrk "${@:2}" -s benches/http/ingest.lua "http://127.0.0.1:$port/v1/events"
  echo "the daemon used $(echo "$(daemon_cpu) - $before" | bc) s of CPU"
}
echo "== NDJSON batches of 1,000 events, keep-alive, 2 threads, 8 connections, ${secs}s"
run_wrk "$work/batches" -t2 -c8 -d"${secs}s"
echo "== one event per request, keep-alive, 2 threads, 32 connections, ${secs}s"
run_wrk "$work/singles" -t2 -c32 -d"${secs}s"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^transfer_guard_events_(ingested|duplicate)_total' | awk '{s[$1 ~ /duplicate/]+=$2} END {printf "ingested %d events, %d of them repeats of a body already sent\n", s[0], s[1]}'
