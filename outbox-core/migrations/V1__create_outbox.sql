-- Outbox schema, version 1. Lives in the PRODUCER's database.
-- Plain PostgreSQL (11+): apply with `outbox-relay migrate`, psql, Flyway or any tool.
-- Every table, column and index is documented in migrations/README.md.

CREATE TABLE outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    event_version   integer     NOT NULL DEFAULT 1,
    topic           text,
    payload         jsonb,
    payload_bytes   bytea,
    content_type    text        NOT NULL DEFAULT 'application/json',
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    correlation_id  text,
    causation_id    text,
    traceparent     text,
    tracestate      text,
    source          text,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    status          text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    published_at    timestamptz,
    failed_at       timestamptz,

    CONSTRAINT outbox_event_id_key UNIQUE (event_id),
    CONSTRAINT outbox_aggregate_type_not_empty CHECK (aggregate_type <> ''),
    CONSTRAINT outbox_aggregate_id_not_empty CHECK (aggregate_id <> ''),
    CONSTRAINT outbox_event_type_not_empty CHECK (event_type <> ''),
    CONSTRAINT outbox_event_version_positive CHECK (event_version > 0),
    CONSTRAINT outbox_topic_not_empty CHECK (topic IS NULL OR topic <> ''),
    CONSTRAINT outbox_one_payload CHECK (payload IS NULL OR payload_bytes IS NULL),
    CONSTRAINT outbox_headers_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT outbox_status_known CHECK (status IN ('pending', 'published', 'failed'))
);

-- The relay's claim: the oldest pending rows, in id order.
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE status = 'pending';

-- "Does this key have a failed row?" for the block-the-key poison policy.
CREATE INDEX outbox_failed_key_idx ON outbox (aggregate_type, aggregate_id) WHERE status = 'failed';

-- Retention cleanup of rows kept after publishing (mark mode).
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE status = 'published';

-- Wake the relay at commit. Statement level: one notification per inserting
-- statement, not per row; PostgreSQL also folds identical notifications of one
-- transaction into one. Turn it off with
--   ALTER TABLE outbox DISABLE TRIGGER outbox_notify;
-- and the relay falls back to polling.
CREATE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox_notify();
