-- The bank example's read model: what `bank consume` builds from the topic,
-- and what `bank balance` reads. `bank setup` (and `bank sandbox`) apply it;
-- safe to run again. The events table itself is walrelay's (sql/).

-- The query model: one row per open account.
CREATE TABLE IF NOT EXISTS balances (
    account_id text        PRIMARY KEY,
    -- Never negative: a withdrawal past the balance is refused by the
    -- command side, so a row that would go negative means an event was
    -- applied twice or out of order, and the consumer stops on it.
    balance    bigint      NOT NULL CHECK (balance >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The consumer's position, per aggregate: the seq_nr of the last event
-- applied, written in the same transaction as the change it made. An event
-- at or below it is a replay (skipped); one past it + 1 is a gap (not
-- applied, reported). This, not the Kafka offset, is what makes applying
-- exactly once.
CREATE TABLE IF NOT EXISTS balances_position (
    aggregate_id text        PRIMARY KEY,
    last_seq_nr  bigint      NOT NULL,
    -- The commit LSN (`lsn` header) of the last event applied.
    last_lsn     pg_lsn,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per application of an event, in the same transaction: the
-- evidence that no event was applied twice (`bank verify` counts). A real
-- service would not need it. No unique key on purpose: a double
-- application must show here, not fail.
CREATE TABLE IF NOT EXISTS balances_applied (
    aggregate_id    text        NOT NULL,
    seq_nr          bigint      NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS balances_applied_event ON balances_applied (aggregate_id, seq_nr);

-- Partitions the consumer has stopped at: the record at kafka_offset
-- cannot be applied (a seq_nr gap, or a record it cannot read). The row
-- goes when the partition moves on.
CREATE TABLE IF NOT EXISTS balances_stuck (
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    aggregate_id    text,
    seq_nr          bigint,
    reason          text        NOT NULL,
    since           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_topic, kafka_partition)
);
