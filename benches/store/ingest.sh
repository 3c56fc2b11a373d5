#!/usr/bin/env bash
# Ingest through the store of replicas: `transfer-guard ingest FILE` (NDJSON batches of 1,000
# lines, two in flight) into one replica of two sharing a PostgreSQL, against the same into a
# daemon without a store; then how long the other replica takes to have every event.
#   usage: benches/store/ingest.sh [EVENTS] [RUNS]
# Starts its own private cluster (.ci/postgres, fsync on) unless TRANSFER_GUARD_TEST_DATABASE_URL is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-200000}
runs=${2:-3}
if [ -z "${TRANSFER_GUARD_TEST_DATABASE_URL:-}" ]; then
  TG_PG_FSYNC=on . .ci/postgres
fi
cargo build --release -q
bin=$PWD/target/release/transfer-guard
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
  if declare -F tg_pg_stop >/dev/null; then tg_pg_stop; fi
}
trap cleanup EXIT
"$bin" bench lines --events "$events" --per-file "$events" --dir "$work/log" >/dev/null
file=$(ls "$work"/log/*)
lines=$(wc -l < "$file")
echo "file: $lines lines, $(du -h "$file" | cut -f1)"
admin=$TRANSFER_GUARD_TEST_DATABASE_URL
config() { # name port store?
  cat <<EOT
[server]
listen = "127.0.0.1:$2"
state_dir = "$work/$1"
[[cbo]]
key = "c0"
ingest_token_env = "TG_T"
EOT
  if [ "$3" = store ]; then printf '[store]\nurl_env = "TG_DB"\n'; fi
}
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^transfer_guard_events_ingested_total\{cbo="c0"/ {s+=$2} END {print s+0}'; }
ready() { for _ in $(seq 200); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return; sleep 0.05; done; echo "not ready on $1" >&2; exit 1; }
for run in $(seq "$runs"); do
  for mode in alone store; do
    rm -rf "$work/a" "$work/b"
    db=""
    if [ $mode = store ]; then
      name="tg_bench_$RANDOM$RANDOM"
      psql "$admin" -qc "CREATE DATABASE $name" >/dev/null 2>&1 || runuser -u postgres -- psql "$admin" -qc "CREATE DATABASE $name" >/dev/null
      db="${admin%/*}/$name"
    fi
    config a 19931 $mode > "$work/a.toml"
    TG_T=bench-token TG_DB=$db RUST_LOG=error "$bin" run --config "$work/a.toml" >/dev/null 2>&1 & pids+=($!)
    ready 19931
    if [ $mode = store ]; then
      config b 19932 store > "$work/b.toml"
      TG_T=bench-token TG_DB=$db RUST_LOG=error "$bin" run --config "$work/b.toml" >/dev/null 2>&1 & pids+=($!)
      ready 19932
    fi
    start=$(date +%s.%N)
    TG_T=bench-token "$bin" ingest --server http://127.0.0.1:19931 --token-env TG_T "$file" > "$work/out" 2>&1
    sent=$(date +%s.%N)
    if [ $mode = store ]; then
      while [ "$(metric 19932)" -lt "$lines" ]; do sleep 0.02; done
      seen=$(date +%s.%N)
      echo "run $run, two replicas on the store: ingest FILE $(echo "$lines / ($sent - $start)" | bc) lines/s; the other replica had all of them $(echo "($seen - $sent) * 1000" | bc | cut -d. -f1) ms after the last answer ($(tail -1 "$work/out"))"
    else
      echo "run $run, one daemon, no store:   ingest FILE $(echo "$lines / ($sent - $start)" | bc) lines/s ($(tail -1 "$work/out"))"
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
  done
done
