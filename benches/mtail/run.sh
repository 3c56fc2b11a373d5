#!/usr/bin/env bash
# Log-line ingest, transfer-guard against mtail (Debian's `mtail`), side by side on the same
# file of `[ConversationTransfer]` lines; each timed three times, medians printed.
#   usage: benches/mtail/run.sh [events]
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-1000000}
cargo build --release -q
bin=target/release/transfer-guard
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" bench lines --events "$events" --per-file "$events" --dir "$work/log" --log-lines >/dev/null
file=$(ls "$work"/log/*)
lines=$(wc -l < "$file")
echo "file: $lines lines, $(du -h "$file" | cut -f1)"
median() { sort -n | sed -n '2p'; }
tg=$(for i in 1 2 3; do "$bin" bench logfile --file "$file" | sed 's/.* \([0-9]*\) lines\/s/\1/'; done | median)
mt=$(for i in 1 2 3; do
  start=$(date +%s.%N)
  mtail --one_shot --one_shot_format=prometheus --progs benches/mtail/transfers.mtail --logs "$file" --logtostderr >/dev/null 2>&1
  end=$(date +%s.%N)
  echo "$lines / ($end - $start)" | bc
done | median)
echo "transfer-guard: $tg lines/s (median of 3; parse, pair, windows)"
echo "mtail:          $mt lines/s (median of 3; wall time of --one_shot, start-up included)"
echo "ratio:          $(echo "scale=1; $tg / $mt" | bc)x"
