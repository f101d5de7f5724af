-- 04_relay_role.sql: least-privilege login role for outbox-relay.
--
-- Why a dedicated role: the relay only needs to open a logical replication connection
-- and read the outbox; it should not be able to write business tables or read anything
-- else if its credentials leak.
--
-- psql variables (all optional):
--   relay_role      role name                                 default: outbox_relay
--   tables          comma-separated tables the relay may read default: public.outbox
--
-- The password comes through the session setting outbox_relay.password, given in
-- PGOPTIONS, never through a psql variable: a variable is pasted into a statement's text,
-- which the server logs (log_statement = all, and the STATEMENT line of any error). The
-- setting travels in the connection's startup packet, which is not logged, and the
-- statement that uses it runs inside PL/pgSQL, whose errors are re-raised here without
-- the statement's text. Without it the role gets change-me, FOR LOCAL/DEV STACKS ONLY.
-- The password is applied when the role is created, or on every run that passes one (so
-- a re-run without it never resets a rotated password). A password containing spaces or
-- backslashes needs them escaped with a backslash in PGOPTIONS.
--
--   PGOPTIONS="-c outbox_relay.password=$SECRET" \
--     psql -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -f sql/04_relay_role.sql
--   # Debezium preset:
--   psql ... -v tables=public.outboxevent -f sql/04_relay_role.sql
--
-- Privileges needed to run this: the REPLICATION attribute can only be granted by a
-- superuser (PostgreSQL 16+: also by a CREATEROLE role that itself has REPLICATION).
--
-- What this does NOT give the relay: ownership of the outbox table. Creating a
-- publication needs table ownership, so either `outbox-relay setup` is run once with
-- the table owner's credentials, or the DBA runs 03_publication.sql first and the relay
-- (as this role) only creates its replication slot, which REPLICATION allows.
--
-- pg_hba.conf: logical replication connections are matched by database name (the
-- `replication` keyword only covers physical replication), so a normal `host <db>
-- outbox_relay ... scram-sha-256` line is enough.

\if :{?relay_role}
\else
\set relay_role outbox_relay
\endif
\if :{?relay_password}
-- Refused before it reaches any statement (see above).
\echo 'sql/04_relay_role.sql: -v relay_password would put the password into a logged statement; pass it as PGOPTIONS="-c outbox_relay.password=..." instead'
\set ON_ERROR_STOP on
SELECT 1 / 0 AS relay_password_must_come_through_pgoptions;
\endif
\if :{?tables}
\else
\set tables public.outbox
\endif

-- DO bodies cannot see psql variables; pass them as session settings.
SELECT set_config('outbox_relay.role', :'relay_role', false) AS role,
       set_config('outbox_relay.tables', :'tables', false) AS tables;

DO $$
DECLARE
    r        text := current_setting('outbox_relay.role');
    pw       text := nullif(current_setting('outbox_relay.password', true), '');
    explicit boolean := pw IS NOT NULL;
    name     text;
    rel      regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
        -- The password goes through EXECUTE, so it is hashed by the server
        -- (password_encryption, scram-sha-256 by default since PostgreSQL 14).
        -- An error is raised again without the statement's text, which holds it.
        BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN REPLICATION PASSWORD %L', r, coalesce(pw, 'change-me'));
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION USING ERRCODE = SQLSTATE,
                MESSAGE = format('creating role %s: %s', r, SQLERRM);
        END;
        RAISE NOTICE 'created role %', r;
        IF NOT explicit THEN
            RAISE WARNING 'role % has the default password; change it outside dev stacks', r;
        END IF;
    ELSE
        -- Re-assert the attributes the relay depends on; no-op if already set.
        EXECUTE format('ALTER ROLE %I LOGIN REPLICATION', r);
        IF explicit THEN
            BEGIN
                EXECUTE format('ALTER ROLE %I PASSWORD %L', r, pw);
            EXCEPTION WHEN OTHERS THEN
                RAISE EXCEPTION USING ERRCODE = SQLSTATE,
                    MESSAGE = format('setting the password of role %s: %s', r, SQLERRM);
            END;
            RAISE NOTICE 'role %: password updated', r;
        END IF;
    END IF;

    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', r);

    -- SELECT on the listed outbox table(s) only, plus USAGE on their schemas so the
    -- names resolve; nothing else in the database is readable by the relay.
    FOREACH name IN ARRAY string_to_array(current_setting('outbox_relay.tables'), ',') LOOP
        name := btrim(name);
        CONTINUE WHEN name = '';
        rel := to_regclass(name);
        IF rel IS NULL THEN
            RAISE EXCEPTION 'table % does not exist (run 01/02 first, or fix -v tables=...)', name;
        END IF;
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I',
                       (SELECT n.nspname FROM pg_class c
                          JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.oid = rel), r);
        EXECUTE format('GRANT SELECT ON TABLE %s TO %I', rel, r);
    END LOOP;
END
$$;

-- Forget the password in this session as soon as it is no longer needed.
SELECT set_config('outbox_relay.password', '', false) AS _pw \gset

SELECT rolname, rolcanlogin, rolreplication, rolsuper, rolcreaterole, rolcreatedb
  FROM pg_roles WHERE rolname = :'relay_role';
