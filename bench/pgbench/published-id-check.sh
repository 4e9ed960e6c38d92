#!/usr/bin/env bash
# Producers at 2,000 rows/s (pgbench, 16 clients, one row per transaction)
# while a WAL relay publishes and remembers the ids, with the producers'
# published-id check as V9 has it (one lookup per id) and as V5 had it (a
# join the planner may turn into a scan of every remembered id). Needs
# ./dev up and the release relay (cargo build --release -p
# outbox-toolkit-relay --features cli). BENCHMARKS.md, set M.
set -uo pipefail
export PGPASSWORD="${PGPASSWORD:-postgres}"
DB=outbox_idcheck; URL=postgres://postgres:${PGPASSWORD}@127.0.0.1:5432/$DB
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/insert.sql" <<'SQL'
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload)
VALUES (gen_random_uuid(), 'bench', 'k' || (random() * 1000)::int, 'bench.row', 'idcheck', jsonb_build_object('pad', repeat('x', 170)));
SQL
V5_CHECK="CREATE OR REPLACE FUNCTION outbox_refuse_published_ids() RETURNS trigger LANGUAGE plpgsql AS \$\$
DECLARE seen record;
BEGIN
  SELECT p.event_id, p.published_at INTO seen FROM inserted i JOIN outbox_published_ids p ON p.event_id = i.event_id LIMIT 1;
  IF FOUND THEN RAISE EXCEPTION 'outbox: event_id % was already published', seen.event_id USING ERRCODE = 'unique_violation'; END IF;
  RETURN NULL;
END \$\$"
cd "$ROOT"
run() {
  local what="$1" sql="$2"
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
  DATABASE_URL=$URL ./target/release/outbox-relay migrate >/dev/null
  [[ -n "$sql" ]] && psql -h 127.0.0.1 -U postgres -d $DB -qc "$sql"
  DATABASE_URL=$URL ./target/release/outbox-relay slot create --slot idcheck --publication idcheck >/dev/null
  DATABASE_URL=$URL RUST_LOG=warn ./target/release/outbox-relay run --source wal --slot idcheck --publication idcheck \
    --http-addr 127.0.0.1:19466 > "$WORK/relay.log" 2>&1 &
  local relay=$!
  sleep 2
  pgbench -h 127.0.0.1 -U postgres -n -c 16 -j 2 -R 2000 -T "${SECS:-40}" -f "$WORK/insert.sql" $DB 2>&1 |
    grep -E "^tps|latency average" | tr '\n' ' '
  echo " <= $what"
  kill $relay; wait $relay
  DATABASE_URL=$URL ./target/release/outbox-relay slot drop --slot idcheck --publication idcheck --with-publication >/dev/null
}
./dev kafka topics --create --topic idcheck --partitions 6 >/dev/null 2>&1 || true
for round in $(seq 1 "${ROUNDS:-2}"); do
  run "V5 check (join)" "$V5_CHECK"
  run "V9 check (one lookup per id)" ""
done
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB"
