-- Outbox schema, version 10: delayed events, published no earlier than a
-- not-before time. Plain PostgreSQL (11+; 13+ for outbox_emit without an
-- event_id). Documented in docs/schema.md, "Delayed events".
--
-- A delayed row is inserted with status = 'delayed' and its not_before
-- time. It is in none of the relay's claim indexes (outbox_pending_idx
-- covers status = 'pending' only) and the WAL source skips inserts that
-- are not pending, so a row due in a month costs nothing until then but
-- its place in the table and in outbox_delayed_idx. Once it is due, a
-- relay deletes it and inserts it again as a new pending row, in one
-- statement: it takes its place in the outbox sequence (and, in WAL mode,
-- in the commit order) at its due time, after everything committed
-- before then, with the same event_id.

ALTER TABLE outbox ADD COLUMN not_before timestamptz;

-- The new status. (The outbox is a queue, small by design: the checks
-- below read it once, under the migration's lock.)
ALTER TABLE outbox DROP CONSTRAINT outbox_status_known;
ALTER TABLE outbox ADD CONSTRAINT outbox_status_known
    CHECK (status IN ('pending', 'published', 'failed', 'delayed'));

-- A delayed row has a due time, and only a delayed row has one: a row
-- inserted with not_before but the default status 'pending' would be
-- published at once, so it is refused instead.
ALTER TABLE outbox ADD CONSTRAINT outbox_delayed_has_not_before
    CHECK ((status = 'delayed') = (not_before IS NOT NULL));

-- The relay's "what is due, and when is the next one?".
CREATE INDEX outbox_delayed_idx ON outbox (not_before) WHERE status = 'delayed';

-- outbox_emit gains not_before. A table-less event cannot wait in the WAL,
-- so a delayed one is written as a delayed row of the outbox table; when
-- due, it is published like any row (the WAL source reads the table too).
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
    IF not_before IS NOT NULL THEN
        -- Delayed (or due already: then an ordinary pending row).
        INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, event_version,
                            topic, payload, payload_bytes, content_type, headers, correlation_id,
                            causation_id, traceparent, tracestate, source, occurred_at,
                            status, not_before)
        VALUES (id, aggregate_type, aggregate_id, event_type, event_version, topic, payload,
                payload_bytes, content_type, headers, correlation_id, causation_id, traceparent,
                tracestate, source, coalesce(occurred_at, now()),
                CASE WHEN not_before > now() THEN 'delayed' ELSE 'pending' END,
                CASE WHEN not_before > now() THEN not_before END);
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
