-- Outbox schema, version 9: the producers' published-id check (V5) looks
-- each inserted id up on its own. Plain PostgreSQL (11+). Documented in
-- docs/schema.md.
--
-- V5's check joined the statement's inserted rows with
-- outbox_published_ids. The planner cannot know that a producer inserts one
-- row, and it often chose a hash join that reads the whole table of
-- remembered ids for every insert. With a relay remembering 2,000 ids a
-- second, producers at 2,000 single-row transactions a second fell to about
-- 1,200 with seconds of queueing (4 of 5 runs; the 5th kept up). One
-- equality lookup per inserted id always uses the hash index: 2,000 a
-- second held with 1.5 ms transactions (BENCHMARKS.md, set M). Same
-- refusal, same error.
CREATE OR REPLACE FUNCTION outbox_refuse_published_ids() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    id uuid;
    at timestamptz;
BEGIN
    FOR id IN SELECT event_id FROM inserted LOOP
        SELECT p.published_at INTO at
        FROM outbox_published_ids p WHERE p.event_id = id LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'outbox: event_id % was already published (at %)', id, at
                USING ERRCODE = 'unique_violation',
                      CONSTRAINT = 'outbox_published_ids',
                      HINT = 'Every event needs a new event_id; consumers drop a repeated id as a duplicate.';
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
