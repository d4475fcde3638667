-- 002_append_only.sql — refuse UPDATE, DELETE and TRUNCATE on events.
--
-- Why: walrelay publishes INSERTs only (the publication in 003 says
-- publish = 'insert'), so a changed or removed row would silently differ
-- from what Kafka consumers have already seen. An event is a fact; to correct
-- one, append a new, compensating event.
--
-- How: one BEFORE ... FOR EACH STATEMENT trigger. Statement level (rather
-- than row level) because TRUNCATE only has statement triggers, and because
-- it refuses the statement itself, even when it would touch no row. Note that
-- this also refuses INSERT ... ON CONFLICT DO UPDATE (PostgreSQL fires the
-- UPDATE statement triggers for it); use ON CONFLICT DO NOTHING or, better, a
-- plain INSERT that fails on a duplicate seq_nr.
--
-- The trigger is set ENABLE ALWAYS so that it also fires for sessions with
-- session_replication_role = replica (logical replication appliers and
-- tools that use that setting to skip triggers).
--
-- A superuser or the table owner can still get around it on purpose, e.g. to
-- purge data under a retention or erasure obligation:
--
--     BEGIN;
--     ALTER TABLE events DISABLE TRIGGER events_append_only;
--     DELETE FROM events WHERE ...;
--     ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only;
--     COMMIT;
--
-- (walrelay never sees such a DELETE: the publication does not publish it.)
--
-- Safe to run again: CREATE OR REPLACE for both the function and the trigger
-- (PostgreSQL 14 or later).

CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- restrict_violation (23001): an integrity rule of the table refused the
    -- statement, the same class of error as a foreign key's ON DELETE RESTRICT,
    -- so clients treat it as a bug to fix and not as a transient failure.
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = 'Events are immutable facts: append a new event that corrects or compensates instead. '
                  || 'walrelay publishes inserts only, so Kafka consumers would never see this change.';
END;
$$;

COMMENT ON FUNCTION events_refuse_change() IS
    'Trigger function that keeps the events table append-only (see sql/002_append_only.sql).';

CREATE OR REPLACE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT
    EXECUTE FUNCTION events_refuse_change();

ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only;
