-- 03_publication.sql: the insert-only publication outbox-relay subscribes to.
--
-- Why a publication: pgoutput only decodes tables that are in the publication the relay
-- names, so this is what limits the replication stream to the outbox. Why insert-only:
-- an outbox is append-only by contract; cleanup DELETEs (or a legacy poller's UPDATE of
-- processed_at) must not turn into Kafka messages, and skipping them also saves WAL
-- decoding and network work.
--
-- psql variables (all optional):
--   publication  publication name                          default: outbox_pub
--   tables       comma-separated list of tables to include default: public.outbox
--
--   psql -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -f sql/03_publication.sql
--   # Debezium-shaped table (02_outbox_debezium.sql), as a second publication:
--   psql -v ON_ERROR_STOP=1 -d "$DATABASE_URL" \
--        -v publication=outboxevent_pub -v tables=public.outboxevent -f sql/03_publication.sql
--
-- Idempotent: creates the publication if it is missing; otherwise makes sure it
-- publishes inserts only and includes every listed table. Tables already in the
-- publication but not listed are left alone (and reported): removing them could
-- silently cut off another consumer of the same publication.
--
-- Privileges: CREATE PUBLICATION ... FOR TABLE needs CREATE on the database and
-- ownership of each table, so run this as the table owner (or a superuser), not as the
-- relay's least-privilege role (04_relay_role.sql).

\if :{?publication}
\else
\set publication outbox_pub
\endif
\if :{?tables}
\else
\set tables public.outbox
\endif

-- psql does not substitute variables inside a DO block's dollar-quoted body, so hand
-- them over as session settings.
SELECT set_config('outbox_relay.publication', :'publication', false) AS publication,
       set_config('outbox_relay.tables', :'tables', false) AS tables;

DO $$
DECLARE
    pub      text := current_setting('outbox_relay.publication');
    rels     regclass[];
    rel      regclass;
    name     text;
    p        pg_publication%ROWTYPE;
    extra    text;
BEGIN
    -- Resolve names first so a typo fails with a clear message before anything changes.
    FOREACH name IN ARRAY string_to_array(current_setting('outbox_relay.tables'), ',') LOOP
        name := btrim(name);
        CONTINUE WHEN name = '';
        rel := to_regclass(name);
        IF rel IS NULL THEN
            RAISE EXCEPTION 'table % does not exist (run 01/02 first, or fix -v tables=...)', name;
        END IF;
        rels := rels || rel;
    END LOOP;
    IF rels IS NULL THEN
        RAISE EXCEPTION 'no tables given (-v tables=schema.table[,...])';
    END IF;

    SELECT * INTO p FROM pg_publication WHERE pubname = pub;
    IF NOT FOUND THEN
        EXECUTE format('CREATE PUBLICATION %I FOR TABLE %s WITH (publish = %L)',
                       pub, array_to_string(rels::text[], ', '), 'insert');
        RAISE NOTICE 'created publication % for %', pub, rels;
        RETURN;
    END IF;

    IF p.puballtables THEN
        -- FOR ALL TABLES would stream every table's inserts to the relay; refuse rather
        -- than quietly accept it.
        RAISE EXCEPTION 'publication % is FOR ALL TABLES; drop it or pick another name', pub;
    END IF;

    -- Only ALTER when something differs: every ALTER invalidates the publication cache
    -- of running walsenders, so a no-op re-run should not touch the catalog.
    IF NOT p.pubinsert OR p.pubupdate OR p.pubdelete OR p.pubtruncate THEN
        EXECUTE format('ALTER PUBLICATION %I SET (publish = %L)', pub, 'insert');
        RAISE NOTICE 'publication %: publish set to insert only', pub;
    END IF;

    FOREACH rel IN ARRAY rels LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                       WHERE pr.prpubid = p.oid AND pr.prrelid = rel) THEN
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pub, rel);
            RAISE NOTICE 'publication %: added table %', pub, rel;
        END IF;
    END LOOP;

    SELECT string_agg(pr.prrelid::regclass::text, ', ') INTO extra
      FROM pg_publication_rel pr
     WHERE pr.prpubid = p.oid AND pr.prrelid <> ALL (rels::oid[]);
    IF extra IS NOT NULL THEN
        RAISE NOTICE 'publication % also contains % (left as is; outbox-relay skips their rows and counts them in outbox_skipped_rows_total)', pub, extra;
    END IF;
END
$$;

-- Show the result, so a run's log records what the relay will see.
SELECT pubname, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate,
       (SELECT string_agg(schemaname || '.' || tablename, ', ')
          FROM pg_publication_tables t WHERE t.pubname = p.pubname) AS tables
  FROM pg_publication p
 WHERE pubname = :'publication';
