#!/usr/bin/env bash
# A burst after a quiet spell: how long a poll relay that idled over an empty
# outbox takes to drain a bulk insert, before autovacuum has analyzed the
# table (BENCHMARKS.md, set Y). It measures what a user meets after a batch
# job or a relay's outage, and it is where a plan made for the empty table
# shows.
#
#   bench/burst-after-idle.sh [rows] [rounds] RELAY_BIN [RELAY_BIN...]
#       defaults: 200000 rows, 3 rounds; binaries alternate within a round
#
# Each round and binary: a fresh database `outbox_burst` (migrated by the
# binary), the relay started on it and left idle for 10 s (its claims find
# nothing, about 20 of them), then `rows` events inserted in one
# transaction, and the seconds from that commit until no row is pending
# (sampled every 0.5 s; given up after 300 s). Services must be up
# (`./dev up`); the topic `bench.burst` is created if missing. Prints one
# line per drain and the median per binary. Stops only the relays it
# started.
set -euo pipefail

rows=200000
rounds=3
[[ ${1:-} =~ ^[0-9]+$ ]] && { rows=$1; shift; }
[[ ${1:-} =~ ^[0-9]+$ ]] && { rounds=$1; shift; }
(($# > 0)) || { echo "usage: $0 [rows] [rounds] RELAY_BIN [RELAY_BIN...]" >&2; exit 2; }

: "${PGHOST:=127.0.0.1}" "${PGPORT:=5432}" "${PGUSER:=postgres}" "${PGPASSWORD:=postgres}"
export PGHOST PGPORT PGUSER PGPASSWORD
brokers=${KAFKA_BROKERS:-127.0.0.1:9092}
db=outbox_burst
url="postgres://$PGUSER:$PGPASSWORD@$PGHOST:$PGPORT/$db"
topic=bench.burst
relay_pid=

stop_relay() {
  if [[ -n $relay_pid ]]; then
    kill "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
    relay_pid=
  fi
}
trap stop_relay EXIT

"$1" topic create --kafka-brokers "$brokers" --partitions 6 "$topic" >/dev/null

declare -A results
for ((round = 1; round <= rounds; round++)); do
  for bin in "$@"; do
    psql -qX -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null 2>&1
    "$bin" migrate --database-url "$url" >/dev/null
    "$bin" run --database-url "$url" --kafka-brokers "$brokers" --topic-template "$topic" \
      --http-addr 127.0.0.1:0 >"/tmp/outbox-burst-relay.log" 2>&1 &
    relay_pid=$!
    sleep 10
    psql -qX -d "$db" -c "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
      SELECT gen_random_uuid(), 'order', 'k' || (g % 1000), 'created', jsonb_build_object('n', g) \
      FROM generate_series(1, $rows) g"
    start=$(date +%s.%N)
    while :; do
      pending=$(psql -qXtA -d "$db" -c "SELECT count(*) FROM outbox WHERE status = 'pending'")
      secs=$(echo "$(date +%s.%N) - $start" | bc)
      if [[ $pending == 0 ]]; then break; fi
      if (($(echo "$secs > 300" | bc))); then secs=">300 ($pending left)"; break; fi
      sleep 0.5
    done
    failed=$(psql -qXtA -d "$db" -c "SELECT count(*) FROM outbox WHERE status = 'failed'")
    stop_relay
    if [[ $failed != 0 ]]; then
      echo "round $round: $bin moved $failed rows to failed; see /tmp/outbox-burst-relay.log" >&2
      exit 1
    fi
    echo "round $round: $bin drained $rows rows in ${secs} s"
    results[$bin]+="$secs "
  done
done
psql -qX -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1
for bin in "$@"; do
  median=$(tr ' ' '\n' <<<"${results[$bin]}" | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')
  echo "median: $bin $median s"
done
