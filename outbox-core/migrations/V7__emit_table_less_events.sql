-- Outbox schema, version 7: table-less events for the relay's WAL source
-- (--source wal). Plain PostgreSQL (11+; 13+ when event_id is left out, for
-- gen_random_uuid()). Documented in docs/schema.md.
--
-- outbox_emit(...) validates an event like the outbox table's constraints
-- do, and writes it as a transactional logical decoding message with the
-- prefix 'outbox': it lands in the WAL only (no heap tuple, no index entry,
-- nothing for vacuum), and a relay reading the slot receives it when, and
-- only if, the calling transaction commits, in commit order with the rows
-- of the outbox table. The content is one JSON object whose keys are the
-- outbox table's columns ("v": 1 is the format's version); the payload is
-- jsonb's own text rendering, so the record on Kafka is the same byte for
-- byte as for a row.
--
-- Without wal_level = logical no slot can ever read the message, so the
-- function refuses to run rather than let the event vanish.
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
    payload_bytes  bytea       DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    id uuid := coalesce(event_id, gen_random_uuid());
BEGIN
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'outbox_emit: wal_level is %, not logical: no relay could read this event', current_setting('wal_level')
            USING ERRCODE = '55000',
                  HINT = 'Set wal_level = logical (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL, or append to the outbox table instead.';
    END IF;
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
