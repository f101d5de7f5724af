-- 04_relay_role.sql: least-privilege login role for outbox-relay.
--
-- Why a dedicated role: the relay only needs to open a logical replication connection
-- and read the outbox; it should not be able to write business tables or read anything
-- else if its credentials leak.
--
-- psql variables (all optional):
--   relay_role      role name                                 default: outbox_relay
--   relay_password  password                                  default: change-me
--                   THE DEFAULT IS FOR LOCAL/DEV STACKS ONLY: pass a real secret
--                   anywhere else. The password is applied when the role is created,
--                   or on every run where -v relay_password=... is given explicitly
--                   (so a re-run with defaults never resets a rotated password).
--   tables          comma-separated tables the relay may read default: public.outbox
--
--   psql -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -v relay_password="$SECRET" -f sql/04_relay_role.sql
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
\set relay_password_explicit on
\else
\set relay_password change-me
\set relay_password_explicit off
\endif
\if :{?tables}
\else
\set tables public.outbox
\endif

-- DO bodies cannot see psql variables; pass them as session settings. `\gset` with no
-- output keeps the password out of the run's log.
SELECT set_config('outbox_relay.role', :'relay_role', false) AS role,
       set_config('outbox_relay.tables', :'tables', false) AS tables;
SELECT set_config('outbox_relay.password', :'relay_password', false) AS _pw,
       set_config('outbox_relay.password_explicit', :'relay_password_explicit', false) AS _pwx
\gset

DO $$
DECLARE
    r        text := current_setting('outbox_relay.role');
    pw       text := current_setting('outbox_relay.password');
    explicit boolean := current_setting('outbox_relay.password_explicit')::boolean;
    name     text;
    rel      regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
        -- The password goes through EXECUTE, so it is hashed by the server
        -- (password_encryption, scram-sha-256 by default since PostgreSQL 14).
        EXECUTE format('CREATE ROLE %I LOGIN REPLICATION PASSWORD %L', r, pw);
        RAISE NOTICE 'created role %', r;
        IF NOT explicit THEN
            RAISE WARNING 'role % has the default password; change it outside dev stacks', r;
        END IF;
    ELSE
        -- Re-assert the attributes the relay depends on; no-op if already set.
        EXECUTE format('ALTER ROLE %I LOGIN REPLICATION', r);
        IF explicit THEN
            EXECUTE format('ALTER ROLE %I PASSWORD %L', r, pw);
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
