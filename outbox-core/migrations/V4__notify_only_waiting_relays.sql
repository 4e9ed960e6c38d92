-- Outbox schema, version 4: producers NOTIFY only while a relay waits for it.
-- Plain PostgreSQL (11+). Documented in migrations/README.md.
--
-- Every notifying commit takes PostgreSQL's cluster-wide notification lock
-- and holds it through its WAL flush, so notifying commits run one at a time.
-- A relay that is busy claims again right after each batch and needs no
-- wake-up. So a relay flags itself as waiting just before it sleeps, and
-- producers notify only while some live relay has that flag. Under load no
-- producer notifies.

-- Set by a relay just before it waits for a notification; cleared when it
-- has rows to publish again. Null: not waiting.
ALTER TABLE outbox_relays ADD COLUMN waiting_since timestamptz;

-- The statement-level trigger of V1 calls it once per inserting statement.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_relays
               WHERE waiting_since IS NOT NULL AND lease_until > clock_timestamp()) THEN
        PERFORM pg_notify('outbox', '');
    END IF;
    RETURN NULL;
END
$$;
