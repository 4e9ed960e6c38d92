-- Outbox schema, version 10: delayed events, published no earlier than a
-- not-before time. Plain PostgreSQL (11+; 13+ for outbox_emit without an
-- event_id). Documented in docs/schema.md, "V10: delayed events".
--
-- A delayed event waits in a table of its own, outbox_delayed, not in the
-- outbox: the relay's claims and the WAL source never see it, and the
-- outbox table stays as small as its backlog (rows kept in the outbox
-- table itself, whatever their status, slowed the relay's drain by a
-- quarter at 100,000 rows: BENCHMARKS.md, delayed events). Once it is due,
-- a relay moves it into the outbox as a new pending row, in one statement:
-- it takes its place in the outbox sequence (and, in WAL mode, in the
-- commit order) at its due time, after everything committed before then,
-- with the same event_id.

CREATE TABLE outbox_delayed (
    -- Insert order: rows due at one moment move in this order.
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
    -- Published no earlier than this.
    not_before      timestamptz NOT NULL,

    CONSTRAINT outbox_delayed_event_id_key UNIQUE (event_id),
    CONSTRAINT outbox_delayed_aggregate_type_not_empty CHECK (aggregate_type <> ''),
    CONSTRAINT outbox_delayed_aggregate_id_not_empty CHECK (aggregate_id <> ''),
    CONSTRAINT outbox_delayed_event_type_not_empty CHECK (event_type <> ''),
    CONSTRAINT outbox_delayed_event_version_positive CHECK (event_version > 0),
    CONSTRAINT outbox_delayed_topic_not_empty CHECK (topic IS NULL OR topic <> ''),
    CONSTRAINT outbox_delayed_one_payload CHECK (payload IS NULL OR payload_bytes IS NULL),
    CONSTRAINT outbox_delayed_headers_object CHECK (jsonb_typeof(headers) = 'object')
);

-- The relay's "what is due, in order, and when is the next one?".
CREATE INDEX outbox_delayed_due_idx ON outbox_delayed (not_before, id);

-- outbox_emit gains not_before. A table-less event cannot wait in the WAL,
-- so a delayed one is written to outbox_delayed; when due, it moves into
-- the outbox and is published like any row (the WAL source reads the
-- outbox table too).
DROP FUNCTION outbox_emit(text, text, text, jsonb, text, jsonb, uuid, integer, text, text, text,
                          text, text, text, timestamptz, bytea);

CREATE FUNCTION outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb       DEFAULT NULL,
    topic          text        DEFAULT NULL,
    headers        jsonb       DEFAULT '{}'::jsonb,
    event_id       uuid        DEFAULT NULL,
    event_version  integer     DEFAULT 1,
    content_type   text        DEFAULT 'application/json',
    correlation_id text        DEFAULT NULL,
    causation_id   text        DEFAULT NULL,
    traceparent    text        DEFAULT NULL,
    tracestate     text        DEFAULT NULL,
    source         text        DEFAULT NULL,
    occurred_at    timestamptz DEFAULT NULL,
    payload_bytes  bytea       DEFAULT NULL,
    not_before     timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    id uuid := coalesce(event_id, gen_random_uuid());
BEGIN
    IF coalesce(aggregate_type, '') = '' THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_type must not be empty' USING ERRCODE = '23514';
    END IF;
    IF coalesce(aggregate_id, '') = '' THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_id must not be empty' USING ERRCODE = '23514';
    END IF;
    IF coalesce(event_type, '') = '' THEN
        RAISE EXCEPTION 'outbox_emit: event_type must not be empty' USING ERRCODE = '23514';
    END IF;
    IF event_version IS NULL OR event_version <= 0 THEN
        RAISE EXCEPTION 'outbox_emit: event_version must be positive, not %', event_version USING ERRCODE = '23514';
    END IF;
    IF topic = '' THEN
        RAISE EXCEPTION 'outbox_emit: topic must be NULL (the relay''s template) or not empty' USING ERRCODE = '23514';
    END IF;
    IF payload IS NOT NULL AND payload_bytes IS NOT NULL THEN
        RAISE EXCEPTION 'outbox_emit: give payload or payload_bytes, not both' USING ERRCODE = '23514';
    END IF;
    IF headers IS NULL OR jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_emit: headers must be a JSON object' USING ERRCODE = '23514';
    END IF;
    IF coalesce(content_type, '') = '' THEN
        RAISE EXCEPTION 'outbox_emit: content_type must not be empty' USING ERRCODE = '23514';
    END IF;
    IF not_before > now() THEN
        INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type, event_version,
                                    topic, payload, payload_bytes, content_type, headers,
                                    correlation_id, causation_id, traceparent, tracestate, source,
                                    occurred_at, not_before)
        VALUES (id, aggregate_type, aggregate_id, event_type, event_version, topic, payload,
                payload_bytes, content_type, headers, correlation_id, causation_id, traceparent,
                tracestate, source, coalesce(occurred_at, now()), not_before);
        RETURN id;
    ELSIF not_before IS NOT NULL THEN
        -- Due already: an ordinary row (any source publishes it).
        INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, event_version,
                            topic, payload, payload_bytes, content_type, headers, correlation_id,
                            causation_id, traceparent, tracestate, source, occurred_at)
        VALUES (id, aggregate_type, aggregate_id, event_type, event_version, topic, payload,
                payload_bytes, content_type, headers, correlation_id, causation_id, traceparent,
                tracestate, source, coalesce(occurred_at, now()));
        RETURN id;
    END IF;
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'outbox_emit: wal_level is %, not logical: no relay could read this event', current_setting('wal_level')
            USING ERRCODE = '55000',
                  HINT = 'Set wal_level = logical (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL, or append to the outbox table instead.';
    END IF;
    PERFORM pg_logical_emit_message(true, 'outbox', convert_to(json_build_object(
        'v', 1,
        'event_id', id,
        'aggregate_type', aggregate_type,
        'aggregate_id', aggregate_id,
        'event_type', event_type,
        'event_version', event_version,
        'topic', topic,
        'payload', payload::text,
        'payload_bytes', translate(encode(payload_bytes, 'base64'), E'\n', ''),
        'content_type', content_type,
        'headers', headers,
        'correlation_id', correlation_id,
        'causation_id', causation_id,
        'traceparent', traceparent,
        'tracestate', tracestate,
        'source', source,
        'occurred_at', coalesce(occurred_at, now())
    )::text, 'UTF8'));
    RETURN id;
END
$$;
