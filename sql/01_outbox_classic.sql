-- 01_outbox_classic.sql: the "classic" outbox table (preset: classic).
--
-- Application code INSERTs one row per domain event in the same transaction as the
-- business change; outbox-relay picks the INSERTs up from logical replication, so the
-- event is published if and only if the business transaction committed.
--
-- Idempotent: safe to run again (IF NOT EXISTS everywhere); it never alters an existing
-- table, so a table that drifted from this shape is left for a human to reconcile.
--
--   psql -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -f sql/01_outbox_classic.sql

CREATE TABLE IF NOT EXISTS public.outbox (
    -- Monotonic within a single writer only; ordering guarantees come from the WAL
    -- (commit order), not from this column.
    id            BIGSERIAL    PRIMARY KEY,
    -- Stable identity of the event, sent along with it so consumers can de-duplicate:
    -- delivery is at-least-once (a relay crash after the broker acked but before the
    -- slot was confirmed re-sends the event).
    event_id      UUID         NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    event_type    TEXT         NOT NULL,
    -- Used as the Kafka message key, so all events of one aggregate land in one
    -- partition and keep their relative order.
    aggregate_id  TEXT         NOT NULL,
    payload       JSONB        NOT NULL,
    -- When the business fact happened (may be set by the application); created_at is
    -- when the row was written.
    occurred_at   TIMESTAMPTZ  NOT NULL DEFAULT now(),
    -- Not needed by the log-based relay (it never UPDATEs). Kept so a legacy polling
    -- publisher can run side by side during a cutover, and so cleanup jobs can tell
    -- which rows were handled by such a poller.
    processed_at  TIMESTAMPTZ,
    created_at    TIMESTAMPTZ  NOT NULL DEFAULT now()
);

-- A polling publisher (or a cutover/cleanup job) only ever looks for rows not yet
-- processed; a partial index keeps that lookup small however large the table grows,
-- and costs nothing for rows once they are marked processed.
CREATE INDEX IF NOT EXISTS outbox_unprocessed_idx
    ON public.outbox (id)
    WHERE processed_at IS NULL;

-- The relay's publication is insert-only, so the default REPLICA IDENTITY (primary
-- key) is enough: no UPDATE/DELETE is ever decoded for this table.
COMMENT ON TABLE public.outbox IS
    'Transactional outbox: rows are streamed to Kafka by outbox-relay via logical replication (publication outbox_pub).';
