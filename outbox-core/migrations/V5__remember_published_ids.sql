-- Outbox schema, version 5: an event id that was published cannot be
-- inserted again. Plain PostgreSQL (11+). Documented in migrations/README.md.
--
-- The relay deletes a row once Kafka acknowledged it (the default), and the
-- unique constraint on outbox.event_id then no longer sees that id: the same
-- id inserted later, with another payload, would be published again, and
-- every consumer that deduplicates by id would drop it without a trace. So
-- the relay remembers each id it deleted, in the claim's own transaction,
-- for its --remember-published window (default 7 days, consumer-kit's
-- processed_ttl), and an insert that reuses one fails like a unique
-- violation, in the producer's transaction.

-- No primary key: a hash index is enough for the one question asked ("is
-- this id here?") and costs the relay about half of a unique btree's
-- insert (random uuids touch random btree pages). An id is here at most
-- once anyway: the outbox's unique constraint and the trigger below keep a
-- published id from being inserted, so from being published, again.
CREATE TABLE outbox_published_ids (
    event_id     uuid        NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_published_ids_event_id
    ON outbox_published_ids USING hash (event_id);

-- Ids arrive in time order: a BRIN index finds the expired ones for the
-- relay's cleanup at almost no cost per insert.
CREATE INDEX outbox_published_ids_published_at
    ON outbox_published_ids USING brin (published_at);

-- Once per inserting statement, over the rows it inserted.
CREATE FUNCTION outbox_refuse_published_ids() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    seen record;
BEGIN
    SELECT p.event_id, p.published_at INTO seen
    FROM inserted i JOIN outbox_published_ids p ON p.event_id = i.event_id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'outbox: event_id % was already published (at %)', seen.event_id, seen.published_at
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'outbox_published_ids',
                  HINT = 'Every event needs a new event_id; consumers drop a repeated id as a duplicate.';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_refuse_published_ids
    AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_refuse_published_ids();
