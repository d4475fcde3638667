-- 001_events.sql — the event store that walrelay publishes to Kafka.
--
-- Apply the files of this directory in name order, as the table's owner (or a
-- superuser), to the database the application writes its events to:
--
--     psql -v ON_ERROR_STOP=1 -d DBNAME -f sql/001_events.sql
--
-- Every file is safe to run again: it only adds what is missing.
--
-- One row is one event, a fact that happened to one aggregate (an order, an
-- account, ...). Rows are only ever appended (002_append_only.sql enforces
-- it), and walrelay streams each committed INSERT from the write-ahead log:
--
--   Kafka key      <- aggregate_id (so one aggregate's events share a partition
--                     and stay in order)
--   Kafka value    <- payload, as PostgreSQL renders it (JSON text)
--   Kafka headers  <- every other column by name, plus lsn and commit_ts
--
-- Writers append with a plain INSERT, naming the next seq_nr they expect:
--
--     INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
--     VALUES ('order-42', 3, 'OrderShipped', '{"carrier": "DHL"}');
--
-- The primary key makes that an optimistic-concurrency check: when two
-- writers race to append seq_nr 3 to the same aggregate, the second one fails
-- with unique_violation (SQLSTATE 23505), re-reads the aggregate and retries.
-- Do not use ON CONFLICT DO UPDATE: the table refuses updates.

CREATE TABLE IF NOT EXISTS events (
    -- The aggregate the event belongs to; becomes the Kafka message key.
    aggregate_id text        NOT NULL,
    -- Position of the event within its aggregate, 1, 2, 3, ... Consumers use
    -- it to drop the duplicates an at-least-once pipeline may deliver.
    seq_nr       bigint      NOT NULL CHECK (seq_nr > 0),
    -- What happened, e.g. 'OrderShipped'; a topic can be chosen by it
    -- (--topic 'events.{event_type}').
    event_type   text        NOT NULL,
    -- The event's body; becomes the Kafka message value.
    payload      jsonb       NOT NULL,
    -- Correlation ids, the acting user, ...: travels as a Kafka header.
    metadata     jsonb       NOT NULL DEFAULT '{}',
    -- When the row was written (the inserting transaction's start time).
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_id, seq_nr)
);

COMMENT ON TABLE events IS
    'Append-only event store, published to Kafka by walrelay from the publication walrelay_events.';
COMMENT ON COLUMN events.seq_nr IS
    'Position within the aggregate, from 1; the primary key rejects a second writer of the same position.';
