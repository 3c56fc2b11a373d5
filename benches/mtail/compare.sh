#!/usr/bin/env bash
# The mtail comparison on both user paths, same file, same sitting: `run` with a
# [[sources.file]] read from its start (`bench backlog`), mtail --one_shot, and `ingest FILE`
# into a running daemon of one CBO on 127.0.0.1:19911; three runs each.
#   usage: benches/mtail/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
bin=target/release/transfer-guard
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" bench lines --events 1000000 --per-file 1000000 --dir $work/log --log-lines >/dev/null
file=$(ls $work/log/*)
lines=$(wc -l < "$file")
echo "file: $lines lines, $(du -h "$file" | cut -f1)"
for i in 1 2 3; do RUST_LOG=error "$bin" bench backlog --file "$file" 2>/dev/null; done
# mtail twice: counting transfer lines only (lines.mtail, its fastest) and counting them by
# event and Bad Request (transfers.mtail, nearer what transfer-guard does).
for prog in lines transfers; do
  for i in 1 2 3; do
    start=$(date +%s.%N)
    mtail --one_shot --one_shot_format=prometheus --progs benches/mtail/$prog.mtail --logs "$file" --logtostderr >/dev/null 2>&1
    end=$(date +%s.%N)
    echo "mtail ($prog.mtail): $(echo "$lines / ($end - $start)" | bc) lines/s"
  done
done
cat > $work/c.toml <<EOT
[server]
listen = "127.0.0.1:19911"
state_dir = "$work/state"
[[cbo]]
key = "c0"
ingest_token_env = "TG_T"
EOT
for i in 1 2 3; do
  rm -rf $work/state
  TG_T=bench-token RUST_LOG=error "$bin" run --config $work/c.toml >/dev/null 2>&1 &
  pid=$!
  sleep 1.5
  start=$(date +%s.%N)
  TG_T=bench-token "$bin" ingest --server http://127.0.0.1:19911 --token-env TG_T "$file" >$work/ingest.out 2>&1 || true
  end=$(date +%s.%N)
  echo "ingest FILE: $(echo "$lines / ($end - $start)" | bc) lines/s ($(tail -1 $work/ingest.out))"
  kill $pid; wait $pid 2>/dev/null || true
done
