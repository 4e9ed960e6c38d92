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

-- Runs once per transaction, at commit (the trigger below is deferred), so
-- it reads the flag as late as possible: a relay that started waiting while
-- the transaction ran is still seen.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('outbox.notify_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('outbox.notify_checked', 'on', true);
    IF EXISTS (SELECT 1 FROM outbox_relays
               WHERE waiting_since IS NOT NULL AND lease_until > clock_timestamp()) THEN
        PERFORM pg_notify('outbox', '');
    END IF;
    RETURN NULL;
END
$$;

-- Same name as before, so `ALTER TABLE outbox DISABLE TRIGGER outbox_notify`
-- still turns notifications off.
DROP TRIGGER outbox_notify ON outbox;
CREATE CONSTRAINT TRIGGER outbox_notify
    AFTER INSERT ON outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    EXECUTE FUNCTION outbox_notify();
