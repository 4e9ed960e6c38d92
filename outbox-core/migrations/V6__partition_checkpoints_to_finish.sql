-- Outbox schema, version 6: exactly-once relays remember, per key
-- partition, which previous owners' checkpoints must be finished before the
-- partition is claimed. Plain PostgreSQL (11+). Documented in docs/schema.md.
--
-- A relay in exactly-once mode (--exactly-once) that takes a partition over
-- from a relay whose lease ran out appends that relay's id here, in the
-- take-over's own statement. Before it claims from the partition it fences
-- those relays in Kafka, finishes their last checkpoints (the rows they had
-- committed in Kafka but not yet in the database) and empties the list. If
-- it dies first, the list stays, and the next owner does the same for every
-- id in it. Claims never take rows of a partition whose list is not empty.
-- Relays without --exactly-once empty the list when they take a partition.
ALTER TABLE outbox_relay_partitions
    ADD COLUMN unfenced text[] NOT NULL DEFAULT '{}';
