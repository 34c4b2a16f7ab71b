"""Every SQL statement pg-watchdog runs, in one place so a DBA can read exactly what it does.

Values always travel as parameters; nothing from the config or from a session
is ever formatted into SQL text.
"""

# One statement per sweep: the sessions, the server's clock and its slot limits.
# now() is the statement's start, the same instant pg_stat_activity is read. The rows are of
# three kinds, told apart by which columns are NULL: one row of the server's values (pid,
# usesysid and datid NULL; now, and the rest in one array), one row per role and per
# database (pid NULL; usesysid or datid set, with its name, rolsuper and member_of), then
# one row per backend (pid set). A name is sent and decoded once per role or database, not
# once per session, and no session row is joined to anything: the statement costs the
# server less than `SELECT * FROM pg_stat_activity`, which joins every row to pg_database
# and pg_authid. pg_stat_get_activity(NULL) is what that view reads. A backend row's
# backend_type is NULL for a client backend (most rows: the client decodes no text for it).
#
# Roles and databases come in full while there are at most $2 of them (the usual server);
# beyond, only those of the backends present (read from the same per-transaction copy of the
# backends' status that pg_stat_get_activity reads), so a server with ten thousand roles
# does not send them all every sweep. The OR evaluates the second test only when needed.
#
# Text the server does not convert comes as bytes (textsend): pg_stat_activity.query of a
# session in another database is that database's encoding, and role and database names are
# in whatever encoding created them. Decoding them as UTF-8 would fail the whole look on
# one LATIN1 or SQL_ASCII byte, so snapshot.py decodes them itself, losslessly.
#
# $1 lists the roles that member_of rules name: each role row carries those it is a member
# of (directly or through other roles; a role is a member of itself), by walking
# pg_auth_members down from the listed roles: not pg_has_role(), which counts a superuser
# as a member of every role.
# Lock waits are read only for sessions waiting on a lock (the MATERIALIZED CTE is scanned
# on first use only), so the statement costs nothing more while nobody waits.
SNAPSHOT = """
WITH RECURSIVE members(oid, rolname) AS (
    SELECT oid, rolname::text FROM pg_roles WHERE rolname = ANY($1::text[])
    UNION
    SELECT a.member, m.rolname FROM members m JOIN pg_auth_members a ON a.roleid = m.oid
), present AS (
    SELECT pg_stat_get_backend_userid(i) AS usesysid, pg_stat_get_backend_dbid(i) AS datid
    FROM pg_stat_get_backend_idset() i
), waits AS MATERIALIZED (
    SELECT pid, min(waitstart) AS wait_start FROM pg_locks WHERE NOT granted GROUP BY pid
)
SELECT NULL::int AS pid, NULL AS backend_type, NULL::timestamptz AS backend_start,
       NULL::oid AS usesysid, NULL::oid AS datid, NULL AS application_name,
       NULL AS client_addr, NULL AS state, NULL::timestamptz AS state_change,
       NULL::timestamptz AS xact_start, NULL::timestamptz AS query_start,
       NULL::bytea AS query, NULL::int AS leader_pid, NULL::int AS client_port,
       NULL::int[] AS blocked_by, NULL::timestamptz AS wait_start, NULL::int AS xmin_age,
       NULL::bytea AS name, NULL::bool AS rolsuper, NULL::text[] AS member_of,
       now() AS now,
       ARRAY[pg_backend_pid(), current_setting('server_version_num')::int,
             current_setting('max_connections')::int,
             current_setting('superuser_reserved_connections')::int,
             coalesce(current_setting('reserved_connections', true), '0')::int,
             pg_is_in_recovery()::int] AS server
UNION ALL
SELECT NULL, NULL, NULL, r.oid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, textsend(r.rolname::text), r.rolsuper,
       ARRAY(SELECT m.rolname FROM members m WHERE m.oid = r.oid ORDER BY m.rolname),
       NULL, NULL
FROM pg_roles r
WHERE (SELECT count(*) FROM pg_roles) <= $2 OR r.oid IN (SELECT usesysid FROM present)
UNION ALL
SELECT NULL, NULL, NULL, NULL, d.oid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, textsend(d.datname::text), NULL, NULL,
       NULL, NULL
FROM pg_database d
WHERE (SELECT count(*) FROM pg_database) <= $2 OR d.oid IN (SELECT datid FROM present)
UNION ALL
SELECT s.pid, CASE WHEN s.backend_type <> 'client backend' THEN coalesce(s.backend_type, '') END,
       s.backend_start, s.usesysid, s.datid,
       coalesce(s.application_name, ''), host(s.client_addr), s.state, s.state_change,
       s.xact_start, s.query_start, textsend(s.query), s.leader_pid, s.client_port,
       CASE WHEN s.wait_event_type = 'Lock' THEN pg_blocking_pids(s.pid) END,
       CASE WHEN s.wait_event_type = 'Lock'
            THEN (SELECT w.wait_start FROM waits w WHERE w.pid = s.pid)
       END,
       age(s.backend_xmin),
       NULL, NULL, NULL, NULL, NULL
FROM pg_stat_get_activity(NULL) s
"""

# The race-safe action, for a whole batch in one statement. Each backend is
# signalled only if, in a fresh look taken just before its own signal, it is the
# same session (pid, backend_start) still in the same state since the same
# state_change. pg_stat_clear_snapshot() drops the statement's cached copy of the
# activity table, so the look is microseconds old, not as old as the statement;
# it returns void, which is never NULL, so the CASE always yields v.pid and only
# exists to make the call happen per row. CASE evaluates the signalling branch
# only for rows whose verdict is 'signal'. Each signal is named explicitly: an action that
# is neither 'terminate' nor 'cancel' is never signalled ('unknown_action'), never a kill.
ACT = """
WITH me AS (
    SELECT oid, rolsuper, pg_has_role(oid, 'pg_signal_backend', 'USAGE') AS can_signal
    FROM pg_roles WHERE rolname = current_user
)
SELECT v.pid, j.verdict,
       CASE WHEN j.verdict <> 'signal' THEN NULL
            WHEN v.action = 'cancel' THEN pg_cancel_backend(v.pid)
            WHEN v.action = 'terminate' THEN pg_terminate_backend(v.pid)
       END AS signalled
FROM unnest($1::int[], $2::timestamptz[], $3::text[], $4::timestamptz[], $5::text[])
        AS v(pid, backend_start, state, state_change, action)
CROSS JOIN me
CROSS JOIN LATERAL (
    SELECT CASE
             WHEN v.action IS NULL OR v.action NOT IN ('terminate', 'cancel')
               THEN 'unknown_action'
             WHEN a.pid IS NULL OR a.backend_start IS DISTINCT FROM v.backend_start THEN 'gone'
             WHEN a.state IS DISTINCT FROM v.state
               OR a.state_change IS DISTINCT FROM v.state_change THEN 'changed'
             WHEN r.rolsuper AND NOT me.rolsuper THEN 'denied_superuser'
             WHEN NOT me.rolsuper AND NOT me.can_signal AND a.usesysid IS DISTINCT FROM me.oid
               THEN 'denied'
             ELSE 'signal'
           END AS verdict
    FROM (SELECT 1) AS one
    LEFT JOIN pg_stat_get_activity(
                  CASE WHEN pg_stat_clear_snapshot() IS NOT NULL THEN v.pid END) AS a
           ON a.pid = v.pid
    LEFT JOIN pg_roles r ON r.oid = a.usesysid
) AS j
"""

# Which of a batch of terminated backends are still there (one look for the batch): each
# (pid, backend_start) pair, as a pair; a new backend that reused a pid is not the old one.
# pg_stat_get_activity(NULL) is what pg_stat_activity reads, without its joins to names.
STILL_THERE = """
SELECT a.pid
FROM unnest($1::int[], $2::timestamptz[]) AS v(pid, backend_start)
JOIN pg_stat_get_activity(NULL) a ON a.pid = v.pid AND a.backend_start = v.backend_start
"""

# Where the watchdog is connected, for the audit record's `server` field.
SERVER_ADDR = """
SELECT coalesce(host(inet_server_addr()), current_setting('unix_socket_directories'))
       || ':' || current_setting('port')
"""

# High availability: one watchdog acts per server (per database: advisory locks are
# scoped to the connected database), on the policy file's lock_key (config.policy.LEADER_KEY
# by default).
TRY_LEAD = "SELECT pg_try_advisory_lock($1::bigint)"
# On a reload that turns the instance dry or changes the key: stop competing.
UNLOCK = "SELECT pg_advisory_unlock($1::bigint)"

# `check --connect`: who holds the leader lock now. A bigint key k is kept in pg_locks as
# classid = k >> 32, objid = k & 0xffffffff (both as unsigned 32-bit), objsubid = 1.
# Client details of other roles' sessions need pg_read_all_stats; pg_locks needs nothing.
LOCK_HOLDER = """
SELECT l.pid, a.application_name, host(a.client_addr) AS client_addr, a.backend_start
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = (($1::bigint >> 32) & 4294967295)::oid
  AND l.objid = ($1::bigint & 4294967295)::oid
"""

# `check --connect`: the connected role's privileges and the server's slot settings.
# pg_use_reserved_connections exists on 16+ only; looked up by name, NULL on 15.
CHECK_ROLE = """
SELECT current_user AS role, r.rolsuper,
       current_setting('server_version') AS server_version,
       current_setting('server_version_num')::int AS version_num,
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS read_all_stats,
       pg_has_role(current_user, 'pg_signal_backend', 'USAGE') AS signal_backend,
       (SELECT pg_has_role(current_user, u.oid, 'USAGE') FROM pg_roles u
         WHERE u.rolname = 'pg_use_reserved_connections') AS use_reserved
FROM pg_roles r WHERE r.rolname = current_user
"""

# `check --connect`, managed services: which of $1 (the roles member_of rules name, and the
# providers' admin roles) exist, and the login roles that look like admins with the roles of
# $1 each is a member of. The watchdog's own role is always listed (is_self). Names come as
# bytes, as in SNAPSHOT: a role created from a LATIN1 session is no UTF-8.
ROLES_PRESENT = "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1::text[]) ORDER BY 1"
ADMIN_ROLES = """
WITH RECURSIVE members(oid, rolname) AS (  -- as in SNAPSHOT
    SELECT oid, rolname::text FROM pg_roles WHERE rolname = ANY($1::text[])
    UNION
    SELECT a.member, m.rolname FROM members m JOIN pg_auth_members a ON a.roleid = m.oid
), membership AS (
    SELECT oid, array_agg(rolname ORDER BY rolname) AS member_of FROM members GROUP BY oid
), roles AS (
    SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb,
           r.rolname = current_user AS is_self, coalesce(m.member_of, '{}') AS member_of
    FROM pg_roles r LEFT JOIN membership m ON m.oid = r.oid
    WHERE r.rolcanlogin OR r.rolname = current_user
)
SELECT textsend(rolname::text) AS rolname, rolsuper, rolcreaterole, rolcreatedb, is_self,
       member_of
FROM roles
WHERE is_self OR rolcreaterole OR rolcreatedb OR rolname ILIKE '%admin%'
   OR member_of && $2::text[]
ORDER BY is_self DESC, rolname
"""

# `advise`: one live look per target. The server-wide settings the advice is about (read on
# a connection that sends none of them, so pg_settings shows the server's own values).
ADVISE_SETTINGS = """
SELECT name, setting, unit, source FROM pg_settings WHERE name = ANY($1::text[])
"""

# Per-role and per-database settings (ALTER ROLE / ALTER DATABASE ... SET); a NULL role or
# database is the "all" side of the pair (setrole / setdatabase = 0).
ADVISE_ROLE_SETTINGS = """
SELECT textsend(r.rolname::text) AS role, textsend(d.datname::text) AS database, s.setconfig
FROM pg_db_role_setting s
LEFT JOIN pg_roles r ON r.oid = s.setrole
LEFT JOIN pg_database d ON d.oid = s.setdatabase
"""

# Session counters since the statistics were reset (PostgreSQL 14+; idle time in ms).
ADVISE_DB_STATS = """
SELECT textsend(datname::text) AS datname, sessions, sessions_killed, sessions_abandoned,
       idle_in_transaction_time
FROM pg_stat_database WHERE datname IS NOT NULL
"""

# SQL printed for people (advise, check --connect): the keywords quote_ident() quotes on this
# server (every category but unreserved), so printed names are quoted as the server would.
KEYWORDS = """
SELECT coalesce(array_agg(word::text), '{}') FROM pg_get_keywords() WHERE catcode <> 'U'
"""

# Prepared transactions (two-phase commit): no timeout ends them, and each holds its locks and
# the xmin horizon until someone runs COMMIT/ROLLBACK PREPARED. Read by `status`, `advise` and,
# at most once per interval, by the service (watchdog/pg/prepared.py). Names and the gid come as
# bytes, as in SNAPSHOT. The server's now() makes the age independent of the host's clock.
PREPARED_XACTS = """
SELECT textsend(p.gid) AS gid, p.prepared, textsend(p.owner::text) AS owner,
       textsend(p.database::text) AS database, p.transaction::text AS xid,
       age(p.transaction) AS xid_age,
       extract(epoch FROM now() - p.prepared)::float8 AS age_s
FROM pg_prepared_xacts p
ORDER BY p.prepared, p.gid
"""

# PgBouncer's admin console (simple query protocol, one command per query). SHOW SOCKETS is
# SHOW CLIENTS and SHOW SERVERS in one answer: the one read that names real clients. SHOW POOLS
# and SHOW LISTS count the pools' health in a few rows.
PGBOUNCER_SOCKETS = "SHOW SOCKETS"
PGBOUNCER_CONFIG = "SHOW CONFIG"
PGBOUNCER_POOLS = "SHOW POOLS"
PGBOUNCER_LISTS = "SHOW LISTS"

# `init`: the login roles that are superusers (spared by exclude.superusers; named in the
# file it writes). Names as bytes, as in SNAPSHOT.
INIT_SUPERUSERS = """
SELECT textsend(rolname::text) AS rolname FROM pg_roles
WHERE rolsuper AND rolcanlogin ORDER BY rolname
"""
