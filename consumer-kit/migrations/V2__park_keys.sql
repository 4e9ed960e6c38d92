-- Consumer schema, version 2: parked keys. Lives in each CONSUMER's database.
-- Plain PostgreSQL (11+). Documented in docs/schema.md.
--
-- Under the park-key ordering policy, once an event of a key is
-- dead-lettered, later events of that key are parked here, in order, until
-- the blocking event is resolved (replayed and applied, or discarded by an
-- operator); then they are applied in their original order, exactly once.

-- One row per blocked key of a group.
CREATE TABLE consumer_kit_parked_keys (
    consumer_group     text        NOT NULL,
    topic              text        NOT NULL,
    -- The ordering key: the record key, as text.
    parking_key        text        NOT NULL,
    -- The Kafka partition the key's records arrive on (whose worker drains it).
    kafka_partition    integer     NOT NULL,
    -- The dead-lettered event that blocks the key; NULL once an operator
    -- discarded it (the parked events are then applied without it).
    blocking_event_id  uuid,
    -- Where the blocking event was read, and why it was dead-lettered.
    blocking_position  text        NOT NULL,
    blocking_reason    text        NOT NULL,
    blocked_at         timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT consumer_kit_parked_keys_pkey PRIMARY KEY (consumer_group, topic, parking_key)
);

-- The periodic check of each partition worker for discarded blocks.
CREATE INDEX consumer_kit_parked_keys_partition_idx
    ON consumer_kit_parked_keys (consumer_group, topic, kafka_partition);

-- The events parked behind a blocked key, in arrival order (seq), each the
-- whole record so it can be applied later as it was.
CREATE TABLE consumer_kit_parked_events (
    seq              bigserial   NOT NULL,
    consumer_group   text        NOT NULL,
    topic            text        NOT NULL,
    parking_key      text        NOT NULL,
    event_id         uuid,
    kafka_partition  integer     NOT NULL,
    kafka_offset     bigint      NOT NULL,
    record_key       bytea,
    record_value     bytea,
    -- The record's headers, in order: names and values (a NULL value is a
    -- header without one).
    header_names     text[]      NOT NULL,
    header_values    bytea[]     NOT NULL,
    parked_at        timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT consumer_kit_parked_events_pkey PRIMARY KEY (seq)
);

CREATE INDEX consumer_kit_parked_events_key_idx
    ON consumer_kit_parked_events (consumer_group, topic, parking_key, seq);
