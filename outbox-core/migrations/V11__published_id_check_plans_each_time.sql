-- Outbox schema, version 11: the producers' published-id check (V9) plans
-- its lookup for the table as it is now. Plain PostgreSQL (12+). Documented
-- in docs/schema.md.
--
-- PL/pgSQL keeps a generic plan for the lookup once a connection has run it
-- five times, planned for outbox_published_ids as it was then. When that
-- table had just been emptied and vacuumed (a quiet period's cleanup, or a
-- TRUNCATE), PostgreSQL knows it holds no rows, the generic plan reads it
-- sequentially, and every producer connection keeps reading it that way as
-- a burst fills it, until autovacuum analyzes it again: each insert then
-- reads every remembered id. Measured on 2 cores: 15-17 ms per insert with
-- 200,000 remembered ids, against 0.7-1.4 ms with this function
-- (BENCHMARKS.md, set X; tests/tests/migrations.rs). Planning the one-row
-- lookup costs microseconds and finds the hash index once the table has rows.

ALTER FUNCTION outbox_refuse_published_ids() SET plan_cache_mode = force_custom_plan;
