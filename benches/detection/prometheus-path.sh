#!/usr/bin/env bash
# Detection latency through the usual path, for comparison with `transfer-guard bench detection`:
# the same breach (one Bad Request with bad_requests at one minute) seen by Prometheus scraping
# every 15 s, the alert rule of alerts/ evaluated every 15 s, and Alertmanager's webhook
# (group_wait 0s, the most favourable setting). Prints one line per trial and the median.
#   usage: benches/detection/prometheus-path.sh [trials]
set -euo pipefail
cd "$(dirname "$0")/../.."
trials=${1:-3}
cargo build --release -q
bin=$PWD/target/release/transfer-guard
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tg=$(free); prom=$(free); am=$(free); hook=$(free)
{
  printf '[server]\nlisten = "127.0.0.1:%s"\nadmin_token_env = "ADMIN"\nstate_dir = "%s/state"\n' "$tg" "$work"
  for i in $(seq 0 $((trials - 1))); do
    printf '[[cbo]]\nkey = "c%s"\n[cbo.rules.bad_requests]\nminutes = 1\n' "$i"
  done
} > "$work/tg.toml"
ADMIN=bench-admin RUST_LOG=error "$bin" run --config "$work/tg.toml" & pids+=($!)
cat > "$work/hook.py" <<'PY'
import http.server, json, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        for a in body.get("alerts", []):
            if a["labels"].get("alertname") == "TransferGuardBadRequests" and a["status"] == "firing":
                print(f'{time.time():.3f} {a["labels"]["cbo"]}', flush=True)
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$work/hook.py" "$hook" > "$work/hook.log" & pids+=($!)
cat > "$work/am.yml" <<YML
route:
  receiver: hook
  group_by: [alertname, cbo]
  group_wait: 0s
  group_interval: 1s
receivers:
  - name: hook
    webhook_configs:
      - url: http://127.0.0.1:$hook/
YML
prometheus-alertmanager --config.file="$work/am.yml" --storage.path="$work/am" --web.listen-address="127.0.0.1:$am" --cluster.listen-address= >/dev/null 2>&1 & pids+=($!)
cat > "$work/prom.yml" <<YML
global:
  scrape_interval: 15s
  evaluation_interval: 15s
rule_files: [$PWD/alerts/transfer-guard.rules.yml]
alerting:
  alertmanagers: [{static_configs: [{targets: ['127.0.0.1:$am']}]}]
scrape_configs:
  - job_name: transfer-guard
    static_configs: [{targets: ['127.0.0.1:$tg']}]
YML
prometheus --config.file="$work/prom.yml" --storage.tsdb.path="$work/prom" --web.listen-address="127.0.0.1:$prom" >/dev/null 2>&1 & pids+=($!)
until curl -sf "http://127.0.0.1:$tg/readyz" >/dev/null && curl -sf "http://127.0.0.1:$prom/-/ready" >/dev/null; do sleep 0.2; done
sleep 20
results=()
for i in $(seq 0 $((trials - 1))); do
  sleep "$(python3 -c 'import random; print(random.uniform(0, 15))')"
  ts=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
  start=$(date +%s.%N)
  curl -sf -H 'Authorization: Bearer bench-admin' -H 'Content-Type: application/x-ndjson' \
    --data-binary "{\"cbo\":\"c$i\",\"event\":\"initiated\",\"timestamp\":\"$ts\",\"conversation_sid\":\"CH0000000000000000000000000000000$i\",\"transfer_type\":\"cold\",\"target_type\":\"queue\"}
{\"cbo\":\"c$i\",\"event\":\"failed\",\"timestamp\":\"$ts\",\"conversation_sid\":\"CH0000000000000000000000000000000$i\",\"error\":{\"status\":400}}" \
    "http://127.0.0.1:$tg/v1/events" >/dev/null
  until grep -q " c$i\$" "$work/hook.log"; do sleep 0.1; done
  at=$(grep " c$i\$" "$work/hook.log" | head -1 | cut -d' ' -f1)
  secs=$(echo "$at - $start" | bc)
  echo "trial $i: event to Alertmanager webhook: ${secs}s"
  results+=("$secs")
done
printf '%s\n' "${results[@]}" | sort -n | awk '{a[NR]=$1} END {print "median: " a[int((NR+1)/2)] "s"}'
