#!/usr/bin/env bash
# What one more write costs a small producer transaction, measured with
# pgbench on a private PostgreSQL cluster with wal_level = logical, so that a
# logical-decoding consumer can run beside the producers. It answers: how
# close can any outbox design get to the producer-cost target (<= 1.25)?
#
#   bench/pgbench/producer-floor.sh [rounds] [seconds]     (defaults: 3 rounds of 5 s)
#
# Variants, each as pgbench -M prepared latency per transaction, then the
# median over the rounds of (variant / base):
#   base       BEGIN; INSERT one order row; COMMIT
#   tiny       base + one more tiny row in another table
#   bare       base + an outbox-shaped row in a table with no index or check
#   outbox     base + a row in the real outbox table (migrations V1-V4, no
#              relay running, so the trigger notifies no one)
#   message    base + pg_logical_emit_message(true, 'outbox', <event JSON>),
#              nobody decoding
#   emit       base + SELECT outbox_emit(...) (migration V7: validates the
#              event, then emits it as above): the table-less events the
#              relay's WAL source reads
#   emit-sql   base + the statement outbox_core::emit() sends: the same
#              message built by one SQL expression, validated in Rust, no
#              PL/pgSQL call
#   outbox-notrig, outbox-notify, outbox-check, outbox-nopend
#              the parts of the outbox row: base + a row in a copy of the
#              outbox table (LIKE outbox INCLUDING ALL: its columns,
#              defaults, checks and indexes) with no trigger, with only the
#              NOTIFY trigger, with only the published-id check (V5/V9),
#              and with no trigger and no pending index
#   debezium   base + a row in Debezium's recommended outbox table (uuid
#              primary key, aggregatetype, aggregateid, type, payload jsonb;
#              nothing else), as its outbox event router reads it
#   debezium-del  the same, the row deleted again in the producer's own
#              transaction, as Debezium recommends to keep the table empty
#              (its Quarkus outbox extension's default, remove-after-insert):
#              the log keeps the insert for the connector
#   message+decoder, emit+decoder  the same while pg_recvlogical streams
#              the slot (pgoutput, messages on), as a relay reading messages
#              would; divided by base measured with the same decoder running
#
# The cluster lives in /tmp/outbox-floor-pg-<uid> (readable by the postgres
# user when run as root), listens on 127.0.0.1:${FLOOR_PORT:-5440} only, and is
# stopped at the end. Needs PostgreSQL's server binaries (Debian's
# postgresql package, as ./dev up installs).
set -euo pipefail

ROUNDS="${1:-3}"
SECS="${2:-5}"
PORT="${FLOOR_PORT:-5440}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="/tmp/outbox-floor-pg-$(id -u)"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
if [[ -z "$BIN" || ! -x "$BIN/initdb" ]]; then
  echo "error: PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; run ./dev up first" >&2
  exit 2
fi
WORK="$(mktemp -d)"
RECV_PID=""

as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
  [[ -n "$RECV_PID" ]] && kill "$RECV_PID" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [[ ! -f "$DATA/PG_VERSION" ]]; then
  mkdir -p "$DATA"
  [[ $(id -u) -eq 0 ]] && chown postgres "$DATA"
  as_pg "$BIN/initdb" -D "$DATA" -A trust -U postgres >"$WORK/initdb.log" 2>&1 ||
    { cat "$WORK/initdb.log" >&2; exit 1; }
fi
as_pg "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true # left over from an interrupted run
as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -o \
  "-p $PORT -k $DATA -c listen_addresses=127.0.0.1 -c wal_level=logical -c shared_buffers=128MB -c max_wal_size=1GB" \
  start >/dev/null || {
  echo "error: the private cluster did not start on 127.0.0.1:$PORT (port taken? set FLOOR_PORT); its log:" >&2
  tail -5 "$DATA/server.log" >&2
  exit 1
}

psql_ -c "DROP SCHEMA public CASCADE; CREATE SCHEMA public;" \
  -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots" \
  -c "DROP PUBLICATION IF EXISTS floor_none" >/dev/null
# In version order (V10 after V9, not after V1).
for f in $(ls "$ROOT"/outbox-core/migrations/V*.sql | sort -V); do psql_ -f "$f" >/dev/null; done
psql_ >/dev/null <<'SQL'
CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL,
                           created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE bench_second (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL,
                           created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE bare_outbox (LIKE outbox INCLUDING DEFAULTS INCLUDING IDENTITY);
-- Debezium's documented outbox table for its outbox event router.
CREATE TABLE debezium_outbox (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
                              aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL,
                              payload jsonb);
-- The outbox row's parts: copies of the table, each with some of its triggers.
CREATE TABLE outbox_notrig (LIKE outbox INCLUDING ALL);
CREATE TABLE outbox_notify (LIKE outbox INCLUDING ALL);
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox_notify
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
CREATE TABLE outbox_check (LIKE outbox INCLUDING ALL);
CREATE TRIGGER outbox_refuse_published_ids AFTER INSERT ON outbox_check
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION outbox_refuse_published_ids();
CREATE TABLE outbox_nopend (LIKE outbox INCLUDING ALL);
DO $$ DECLARE i regclass; BEGIN
  SELECT indexrelid::regclass INTO i FROM pg_index
  WHERE indrelid = 'outbox_nopend'::regclass AND pg_get_indexdef(indexrelid) LIKE '%''pending''%';
  EXECUTE 'DROP INDEX ' || i;
END $$;
CREATE PUBLICATION floor_none;  -- no tables: the decoder sends only the messages
SELECT pg_create_logical_replication_slot('floor_slot', 'pgoutput');
SQL

ORDER="INSERT INTO bench_orders (customer, total) VALUES ('c' || :client_id, 1.5) RETURNING id;"
ROW="(event_id, aggregate_type, aggregate_id, event_type, topic, payload) VALUES (gen_random_uuid(), 'order', '123', 'order.created', 'bench-orders', '{\"id\":123,\"customer\":\"c1\"}')"
script() { printf 'BEGIN;\n%s\n%s\nCOMMIT;\n' "$ORDER" "$2" >"$WORK/$1.sql"; }
script base ""
script tiny "INSERT INTO bench_second (customer, total) VALUES ('c' || :client_id, 1.5);"
script bare "INSERT INTO bare_outbox $ROW;"
script outbox "INSERT INTO outbox $ROW;"
for part in notrig notify check nopend; do script "outbox-$part" "INSERT INTO outbox_$part $ROW;"; done
# The event as JSON text with a fresh id, as the message's content.
MESSAGE=$(cat <<'SQL'
SELECT pg_logical_emit_message(true, 'outbox', '{"event_id":"' || gen_random_uuid() || '","aggregate_type":"order","aggregate_id":"123","event_type":"order.created","event_version":1,"topic":"bench-orders","payload":{"id":123,"customer":"c1"},"headers":{},"occurred_at":"2026-11-24T16:00:00Z"}');
SQL
)
script message "$MESSAGE"
script emit "SELECT outbox_emit('order', '123', 'order.created', payload => '{\"id\":123,\"customer\":\"c1\"}', topic => 'bench-orders');"
EMIT_SQL=$(cat <<'SQL'
SELECT CASE WHEN current_setting('wal_level') = 'logical' THEN pg_logical_emit_message(true, 'outbox', convert_to(json_build_object('v', 1, 'event_id', gen_random_uuid(), 'aggregate_type', 'order', 'aggregate_id', '123', 'event_type', 'order.created', 'event_version', 1, 'topic', 'bench-orders', 'payload', '{"id":123,"customer":"c1"}'::jsonb::text, 'payload_bytes', NULL::text, 'content_type', 'application/json', 'headers', '{}'::jsonb, 'correlation_id', NULL::text, 'causation_id', NULL::text, 'traceparent', NULL::text, 'tracestate', NULL::text, 'source', NULL::text, 'occurred_at', now())::text, 'UTF8')) END;
SQL
)
script emit-sql "$EMIT_SQL"
DEBEZIUM_ROW="INSERT INTO debezium_outbox (id, aggregatetype, aggregateid, type, payload) VALUES (gen_random_uuid(), 'order', '123', 'order.created', '{\"id\":123,\"customer\":\"c1\"}')"
script debezium "$DEBEZIUM_ROW;"
script debezium-del "$(printf '%s RETURNING id AS dbz_id \\gset\nDELETE FROM debezium_outbox WHERE id = :dbz_id;' "$DEBEZIUM_ROW")"

latency() { # clients variant -> ms per transaction
  pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c "$1" -j "$1" -T "$SECS" \
    -f "$WORK/$2.sql" postgres 2>"$WORK/pgbench.err" | awk '/latency average/ {print $4}' | grep . ||
    { echo "error: pgbench failed for $2 at $1 clients:" >&2; cat "$WORK/pgbench.err" >&2; exit 1; }
}
caught_up() { # wait until the decoder has confirmed everything written so far
  for _ in $(seq 1 100); do
    lag=$(psql_ -At -c "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots")
    [[ "$lag" -lt 65536 ]] && return 0
    sleep 0.2
  done
  echo "warning: the decoder is still $lag bytes behind" >&2
}

echo "producer floor: pgbench -M prepared, $SECS s per variant, $ROUNDS rounds, PostgreSQL $("$BIN/postgres" -V | awk '{print $3}')"
for round in $(seq 1 "$ROUNDS"); do
  for c in 1 8; do
    for v in base tiny bare outbox outbox-notrig outbox-notify outbox-check outbox-nopend debezium \
      debezium-del message emit emit-sql; do
      ms=$(latency "$c" "$v")
      echo "$round $c $v $ms" >>"$WORK/results"
    done
    "$BIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres --slot floor_slot --start \
      -f /dev/null -F 1 -s 1 -o proto_version=1 -o publication_names=floor_none -o messages=true &
    RECV_PID=$!
    for v in base message emit emit-sql; do
      caught_up
      ms=$(latency "$c" "$v")
      echo "$round $c $v+decoder $ms" >>"$WORK/results"
    done
    kill "$RECV_PID"; wait "$RECV_PID" 2>/dev/null || true; RECV_PID=""
  done
done

python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
lat = {}
for rnd, c, v, ms in rows:
    lat.setdefault((c, v), {})[rnd] = float(ms)
def ratios(c, v, base):
    return [lat[(c, v)][r] / lat[(c, base)][r] for r in lat[(c, v)]]
print(f"{'clients':>7} {'variant':<16} {'latency ms (median)':>20} {'÷ base (median)':>16}  per round")
for c in ("1", "8"):
    for v, base in (("base", "base"), ("tiny", "base"), ("bare", "base"), ("outbox", "base"),
                    ("outbox-notrig", "base"), ("outbox-notify", "base"), ("outbox-check", "base"),
                    ("outbox-nopend", "base"), ("debezium", "base"), ("debezium-del", "base"), ("message", "base"), ("emit", "base"), ("emit-sql", "base"),
                    ("base+decoder", "base+decoder"), ("message+decoder", "base+decoder"),
                    ("emit+decoder", "base+decoder"),
                    ("emit-sql+decoder", "base+decoder")):
        rs = ratios(c, v, base)
        per = " ".join(f"{x:.2f}" for x in rs)
        print(f"{c:>7} {v:<16} {statistics.median(lat[(c, v)].values()):>20.3f} {statistics.median(rs):>16.2f}  {per}")
PY
