-- Consumer schema, version 1. Lives in each CONSUMER's database.
-- Plain PostgreSQL (11+): apply with consumer_kit's migrate call, psql, Flyway or any tool.
-- Every table, column and index is documented in migrations/README.md.

CREATE TABLE processed_events (
    consumer_group  text        NOT NULL,
    event_id        uuid        NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    topic           text,
    kafka_partition integer,
    kafka_offset    bigint,

    CONSTRAINT processed_events_pkey PRIMARY KEY (consumer_group, event_id)
);

-- TTL cleanup deletes the oldest rows in bounded batches.
CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);
