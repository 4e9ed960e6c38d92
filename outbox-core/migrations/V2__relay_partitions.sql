-- Outbox schema, version 2: key partitions with leases, so that several relays
-- share the work while each key is published by one relay at a time.
-- Plain PostgreSQL (11+). Documented in migrations/README.md.

-- The relay partition of an outbox row: a hash of its aggregate id (the Kafka
-- key), so every row of one key falls in one partition. Usable in your own
-- queries: SELECT outbox_partition(aggregate_id, 32) FROM outbox.
CREATE FUNCTION outbox_partition(aggregate_id text, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT (((hashtextextended(aggregate_id, 0) % partitions) + partitions) % partitions)::integer $$;

-- One row per running relay. A relay renews its lease every heartbeat; a relay
-- whose lease ran out counts as gone, and its partitions are taken over.
CREATE TABLE outbox_relays (
    relay_id      text        PRIMARY KEY,
    pid           integer,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    lease_until   timestamptz NOT NULL
);

-- One row per partition: which relay owns it. The number of rows is the number
-- of partitions (32 here). Change it only while no relay runs:
--   DELETE FROM outbox_relay_partitions;
--   INSERT INTO outbox_relay_partitions (partition) SELECT generate_series(0, 63);
CREATE TABLE outbox_relay_partitions (
    partition     integer     PRIMARY KEY,
    owner         text,
    epoch         bigint      NOT NULL DEFAULT 0,
    acquired_at   timestamptz,

    CONSTRAINT outbox_relay_partitions_nonnegative CHECK (partition >= 0)
);

INSERT INTO outbox_relay_partitions (partition) SELECT generate_series(0, 31);
