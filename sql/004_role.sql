-- 004_role.sql — the least-privilege login walrelay runs as.
--
-- walrelay only reads: it streams the events table's inserts from a
-- replication slot and checks the setup. It never writes to any table, so
-- this role gets no INSERT, UPDATE, DELETE, TRUNCATE, CREATE or ownership of
-- anything. What it does get, and why:
--
--   LOGIN        to connect at all.
--   REPLICATION  to create its logical replication slot (--create-slot) and
--                to open the replication connection that streams from it
--                (START_REPLICATION, standby status updates that move
--                confirmed_flush_lsn).
--   CONNECT      on this database: PUBLIC has it by default, but granting it
--                by name keeps walrelay working where an operator revoked it
--                from PUBLIC.
--   USAGE        on the schema of events (public), to name the table.
--   SELECT       on events, for the initial snapshot a new slot exports and
--                for `walrelay check`, which reads the table's columns to
--                verify they map onto the Kafka message.
--
-- Everything else walrelay reads (pg_replication_slots, pg_publication,
-- pg_publication_tables, SHOW wal_sender_timeout) is readable by every role.
--
-- REPLICATION is a strong attribute: with a `replication` line in pg_hba.conf
-- it would also allow a physical base backup of the whole cluster. walrelay
-- does not need one, so in pg_hba.conf give this role only a line for the
-- events database (a logical replication connection is matched by its
-- database name, never by the `replication` keyword), e.g.
--
--     hostssl  events_db  walrelay  10.0.0.0/8  scram-sha-256
--
-- This script sets no password, so that none ends up in a file or in shell
-- history. Set one afterwards, interactively in psql (it is sent already
-- hashed with SCRAM-SHA-256):
--
--     \password walrelay
--
-- or, from a secret store, with
--
--     ALTER ROLE walrelay PASSWORD 'SCRAM-SHA-256$4096:...';  -- a pre-hashed verifier
--
-- and hand walrelay the password through WALRELAY_POSTGRES_URL, not a flag.
--
-- Run as a superuser (creating a role with REPLICATION needs one), in the
-- events database. Safe to run again: the role is created only if missing,
-- and granting a privilege twice is a no-op.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'walrelay') THEN
        -- The NO... attributes are the defaults, spelled out so a reader sees
        -- everything this role cannot do.
        CREATE ROLE walrelay LOGIN REPLICATION
            NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
        RAISE NOTICE 'created role walrelay (no password yet: \password walrelay)';
    END IF;

    -- GRANT CONNECT needs the database's name, and this script works in
    -- whichever database it is run in.
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO walrelay', current_database());

    -- The schema that holds events: public, unless an operator moved it.
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO walrelay',
                   (SELECT n.nspname FROM pg_class c
                    JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE c.oid = 'events'::regclass));
END
$$;

GRANT SELECT ON events TO walrelay;
