-- Outbox schema, version 3: the block-key index holds a hash of the key, not
-- the key. A btree entry must fit in a third of a page (about 2.7 kB), so a
-- row with a longer aggregate_id could not move to 'failed' with the V1 index,
-- and the relay retried that forever. Documented in migrations/README.md.

DROP INDEX outbox_failed_key_idx;

-- "Does this key have a failed row?" for the block-key poison policy; the
-- relay compares the hash, then the key itself.
CREATE INDEX outbox_failed_key_idx ON outbox (hashtextextended(aggregate_id, 0)) WHERE status = 'failed';
