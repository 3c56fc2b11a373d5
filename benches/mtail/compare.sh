#!/usr/bin/env bash
# The mtail comparison on both user paths, same file, same sitting: `run` with a
# [[sources.file]] read from its start (`bench backlog`), mtail --one_shot, and `ingest FILE`
# into a running daemon of one CBO on 127.0.0.1:19911 (journal on).
# The runs are interleaved (backlog, mtail, mtail, ingest; again; ...), so that a machine
# whose speed drifts within the hour slows both sides alike; medians and ratios at the end.
#   usage: benches/mtail/compare.sh [rounds, default 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
cargo build --release -q
bin=target/release/transfer-guard
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" bench lines --events 1000000 --per-file 1000000 --dir $work/log --log-lines >/dev/null
# Each timed run starts with nothing waiting to be written back (the file just generated, a
# journal before): the kernel's writeback would otherwise land in whichever run comes next.
sync
file=$(ls $work/log/*)
lines=$(wc -l < "$file")
echo "file: $lines lines, $(du -h "$file" | cut -f1)"
cat > $work/c.toml <<EOT
[server]
listen = "127.0.0.1:19911"
state_dir = "$work/state"
[[cbo]]
key = "c0"
ingest_token_env = "TG_T"
EOT
mtail_rate() {
  local start end
  start=$(date +%s.%N)
  mtail --one_shot --one_shot_format=prometheus --progs "benches/mtail/$1.mtail" --logs "$file" --logtostderr >/dev/null 2>&1
  end=$(date +%s.%N)
  echo "$lines / ($end - $start)" | bc
}
: > $work/backlog; : > $work/lines; : > $work/transfers; : > $work/ingest
for round in $(seq "$rounds"); do
  sync
  out=$(RUST_LOG=error "$bin" bench backlog --file "$file" 2>/dev/null)
  echo "$out"
  echo "$out" | sed 's/.*: \([0-9]*\) lines\/s.*/\1/' >> $work/backlog
  # mtail twice: counting transfer lines only (lines.mtail, its fastest) and counting them by
  # event and Bad Request (transfers.mtail, nearer what transfer-guard does).
  for prog in lines transfers; do
    sync
    rate=$(mtail_rate $prog)
    echo "mtail ($prog.mtail): $rate lines/s"
    echo "$rate" >> $work/$prog
  done
  rm -rf $work/state
  sync
  TG_T=bench-token RUST_LOG=error "$bin" run --config $work/c.toml >/dev/null 2>&1 &
  pid=$!
  sleep 1.5
  start=$(date +%s.%N)
  TG_T=bench-token "$bin" ingest --server http://127.0.0.1:19911 --token-env TG_T "$file" >$work/ingest.out 2>&1 || true
  end=$(date +%s.%N)
  rate=$(echo "$lines / ($end - $start)" | bc)
  echo "ingest FILE: $rate lines/s ($(tail -1 $work/ingest.out))"
  echo "$rate" >> $work/ingest
  kill $pid; wait $pid 2>/dev/null || true
done
median() { sort -n "$1" | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : int((v[NR/2] + v[NR/2+1]) / 2)}'; }
b=$(median $work/backlog); l=$(median $work/lines); t=$(median $work/transfers); i=$(median $work/ingest)
echo "medians of $rounds: run (backlog) $b, mtail lines.mtail $l, mtail transfers.mtail $t, ingest FILE $i lines/s"
echo "run (backlog): $(echo "scale=2; $b / $l" | bc)x lines.mtail, $(echo "scale=2; $b / $t" | bc)x transfers.mtail"
echo "ingest FILE:   $(echo "scale=2; $i / $l" | bc)x lines.mtail, $(echo "scale=2; $i / $t" | bc)x transfers.mtail"
