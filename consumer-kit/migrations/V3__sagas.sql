-- Consumer schema, version 3: saga instances. Lives in each CONSUMER's
-- database (the one that runs the saga). Plain PostgreSQL (11+).
-- Documented in docs/schema.md and docs/sagas.md.
--
-- One row per instance of an orchestrated saga (consumer_kit::saga). A
-- transition locks the row (SELECT … FOR UPDATE) in the handler's own
-- transaction, the one that also records the event in processed_events and
-- appends the saga's commands to the outbox: the state change, the
-- commands and the dedupe row commit together or not at all.
CREATE TABLE consumer_kit_sagas (
    -- The saga's name (Saga::NAME) and the instance's correlation id.
    saga         text        NOT NULL,
    instance_id  text        NOT NULL,
    -- The state, as the saga's State type serializes it (a JSON string).
    state        text        NOT NULL,
    -- The saga's own data (its Data type as JSON).
    data         jsonb       NOT NULL,
    -- running until a transition completes or fails it.
    status       text        NOT NULL DEFAULT 'running',
    -- Transitions applied so far (1 after the first).
    version      bigint      NOT NULL DEFAULT 0,
    -- Pending timeouts: {"<name>": {"due_at": "…", "event_id": "…"}}; the
    -- event_id is the delayed outbox event that fires it.
    timeouts     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    -- Why it failed (a transition's reason, or an operator's).
    reason       text,

    CONSTRAINT consumer_kit_sagas_pkey PRIMARY KEY (saga, instance_id),
    CONSTRAINT consumer_kit_sagas_status_known CHECK (status IN ('running', 'completed', 'failed')),
    CONSTRAINT consumer_kit_sagas_timeouts_object CHECK (jsonb_typeof(timeouts) = 'object')
);

-- Instances by state, and the ones stuck in a state (operator's list, gauges).
CREATE INDEX consumer_kit_sagas_running_idx
    ON consumer_kit_sagas (saga, state, updated_at) WHERE status = 'running';
