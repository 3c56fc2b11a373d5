#!/usr/bin/env bash
# Failover of replicas on a real PostgreSQL: kill -9 of the leader at a random moment around a
# live rollback (Twilio applying it and answering late), TRIALS times (20 by default). Each
# trial asserts no second rollback, no intent left without a result, the good build live, and
# a handover within twice the lease; prints the handover times (median, max).
#   usage: benches/failover/run.sh [TRIALS]
# Starts its own private cluster (.ci/postgres) unless TRANSFER_GUARD_TEST_DATABASE_URL is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
trials=${1:-20}
if [ -z "${TRANSFER_GUARD_TEST_DATABASE_URL:-}" ]; then
  . .ci/postgres
fi
TRANSFER_GUARD_REQUIRE_TOOLS=1 TRANSFER_GUARD_FAILOVER_TRIALS=$trials \
  cargo test --release --test replicas kill_9_of_the_leader -- --nocapture 2>&1 \
  | grep -E "handovers after kill|trials:|panicked|^test result"
