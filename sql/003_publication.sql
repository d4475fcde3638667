-- 003_publication.sql — the publication walrelay's replication slot decodes.
--
-- A publication names which tables, and which kinds of change, the pgoutput
-- plugin sends to a logical replication client. walrelay asks for
-- walrelay_events (--publication) and expects it to carry the INSERTs of
-- events and nothing else: publishing only inserts keeps a deliberate purge
-- (see 002) from ever reaching Kafka as a half-understood DELETE.
--
-- Needs: the server's wal_level = logical (postgresql.conf, then a restart);
-- run as the owner of events (or a superuser), in the events database.
--
-- Safe to run again. When walrelay_events already exists it is repaired
-- rather than recreated, because dropping a publication that a running
-- walrelay is streaming from breaks its slot:
--   * it is set to publish inserts only;
--   * events is added to it if it does not cover the table yet;
--   * a row filter or column list on events (PostgreSQL 15+) is removed,
--     because either one would make walrelay skip events without noticing.
-- Other tables an operator added to the publication are left alone.

DO $$
DECLARE
    pub_name constant text := 'walrelay_events';
    covered  jsonb;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = pub_name) THEN
        CREATE PUBLICATION walrelay_events FOR TABLE events WITH (publish = 'insert');
        RAISE NOTICE 'created publication %', pub_name;
        RETURN;
    END IF;

    -- Publish exactly inserts: this resets update, delete and truncate.
    IF EXISTS (SELECT FROM pg_publication
               WHERE pubname = pub_name
                 AND (NOT pubinsert OR pubupdate OR pubdelete OR pubtruncate)) THEN
        ALTER PUBLICATION walrelay_events SET (publish = 'insert');
        RAISE NOTICE 'set publication % to publish inserts only', pub_name;
    END IF;

    -- pg_publication_tables resolves FOR ALL TABLES and (on 15+) FOR TABLES IN
    -- SCHEMA too, so it answers "is events covered" in every form. It is read
    -- through to_jsonb because its rowfilter and attnames columns only exist
    -- on 15+; on 14 they simply read as NULL.
    SELECT to_jsonb(pt) INTO covered
    FROM pg_publication_tables pt
    WHERE pt.pubname = pub_name
      AND format('%I.%I', pt.schemaname, pt.tablename)::regclass = 'events'::regclass;

    IF covered IS NULL THEN
        ALTER PUBLICATION walrelay_events ADD TABLE events;
        RAISE NOTICE 'added table events to publication %', pub_name;
    ELSIF covered ->> 'rowfilter' IS NOT NULL
       OR (covered -> 'attnames' IS NOT NULL
           AND jsonb_array_length(covered -> 'attnames') <> (
               SELECT count(*) FROM pg_attribute
               WHERE attrelid = 'events'::regclass AND attnum > 0 AND NOT attisdropped))
    THEN
        -- Dropping and adding again in one transaction clears the filter
        -- without a moment in which events is not published.
        ALTER PUBLICATION walrelay_events DROP TABLE events;
        ALTER PUBLICATION walrelay_events ADD TABLE events;
        RAISE NOTICE 'removed the row filter or column list on events from publication %', pub_name;
    END IF;
END
$$;
