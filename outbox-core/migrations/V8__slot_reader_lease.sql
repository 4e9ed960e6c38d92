-- Outbox schema, version 8: the lease of the relay that reads the WAL
-- (--source wal). Plain PostgreSQL (11+). Documented in docs/schema.md.
--
-- PostgreSQL lets one connection read a replication slot at a time, but a
-- reader whose host froze or fell off the network keeps its connection (and
-- the slot) until wal_sender_timeout, 60 s by default. A relay reads a slot
-- only while it holds the slot's row here with lease_until in the future,
-- renewing it every heartbeat; a relay that takes an expired lease over
-- ends the old reader's connection, and a reader that could not renew
-- stops confirming positions and lets go.
CREATE TABLE outbox_slot_readers (
    slot         text        PRIMARY KEY,
    relay_id     text        NOT NULL,
    lease_until  timestamptz NOT NULL,
    renewed_at   timestamptz NOT NULL DEFAULT now()
);
