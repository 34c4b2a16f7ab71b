"""Every SQL statement pg-watchdog runs, in one place so a DBA can read exactly what it does.

Values always travel as parameters; nothing from the config or from a session
is ever formatted into SQL text.
"""

# One statement per sweep: the sessions, the server's clock and its slot limits.
# now() is the statement's start, the same instant pg_stat_activity is read.
#
# Text the server does not convert comes as bytes (textsend): pg_stat_activity.query of a
# session in another database is that database's encoding, and role and database names are
# in whatever encoding created them. Decoding them as UTF-8 would fail the whole look on
# one LATIN1 or SQL_ASCII byte, so snapshot.py decodes them itself, losslessly.
#
# $1 lists the roles that member_of rules name: each session carries those its role is a
# member of (directly or through other roles), computed once per role, not per session.
# Lock waits are read only for sessions waiting on a lock (the MATERIALIZED CTE is scanned
# on first use only), so the statement costs nothing more while nobody waits.
SNAPSHOT = """
WITH wanted AS (
    SELECT oid, rolname FROM pg_roles WHERE rolname = ANY($1::text[])
), membership AS (
    SELECT r.oid, array_agg(w.rolname::text ORDER BY w.rolname) AS member_of
    FROM pg_roles r JOIN wanted w ON pg_has_role(r.oid, w.oid, 'MEMBER')
    GROUP BY r.oid
), waits AS MATERIALIZED (
    SELECT pid, min(waitstart) AS wait_start FROM pg_locks WHERE NOT granted GROUP BY pid
)
SELECT a.pid, coalesce(a.backend_type, '') AS backend_type, a.backend_start,
       textsend(a.usename::text) AS usename,
       r.rolsuper, textsend(a.datname::text) AS datname,
       coalesce(a.application_name, '') AS application_name,
       host(a.client_addr) AS client_addr, a.state, a.state_change,
       a.xact_start, a.query_start, textsend(a.query) AS query, a.leader_pid,
       a.client_port, coalesce(m.member_of, '{}') AS member_of,
       CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(a.pid) END AS blocked_by,
       CASE WHEN a.wait_event_type = 'Lock'
            THEN (SELECT w.wait_start FROM waits w WHERE w.pid = a.pid)
       END AS wait_start,
       age(a.backend_xmin) AS xmin_age,
       s.now, s.own_pid, s.version_num, s.max_connections, s.su_reserved, s.reserved,
       s.in_recovery
FROM (SELECT now() AS now,
             pg_backend_pid() AS own_pid,
             current_setting('server_version_num')::int AS version_num,
             current_setting('max_connections')::int AS max_connections,
             current_setting('superuser_reserved_connections')::int AS su_reserved,
             coalesce(current_setting('reserved_connections', true), '0')::int AS reserved,
             pg_is_in_recovery() AS in_recovery) s
LEFT JOIN pg_stat_activity a ON true
LEFT JOIN pg_roles r ON r.oid = a.usesysid
LEFT JOIN membership m ON m.oid = a.usesysid
"""

# The race-safe action, for a whole batch in one statement. Each backend is
# signalled only if, in a fresh look taken just before its own signal, it is the
# same session (pid, backend_start) still in the same state since the same
# state_change. pg_stat_clear_snapshot() drops the statement's cached copy of the
# activity table, so the look is microseconds old, not as old as the statement;
# it returns void, which is never NULL, so the CASE always yields v.pid and only
# exists to make the call happen per row. CASE evaluates the signalling branch
# only for rows whose verdict is 'signal'.
ACT = """
WITH me AS (
    SELECT oid, rolsuper, pg_has_role(oid, 'pg_signal_backend', 'USAGE') AS can_signal
    FROM pg_roles WHERE rolname = current_user
)
SELECT v.pid, j.verdict,
       CASE WHEN j.verdict <> 'signal' THEN NULL
            WHEN v.action = 'cancel' THEN pg_cancel_backend(v.pid)
            ELSE pg_terminate_backend(v.pid)
       END AS signalled
FROM unnest($1::int[], $2::timestamptz[], $3::text[], $4::timestamptz[], $5::text[])
        AS v(pid, backend_start, state, state_change, action)
CROSS JOIN me
CROSS JOIN LATERAL (
    SELECT CASE
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

# Which of a batch of terminated backends are still there (one look for the batch).
STILL_THERE = """
SELECT pid FROM pg_stat_activity
WHERE pid = ANY($1::int[]) AND backend_start = ANY($2::timestamptz[])
"""

# Where the watchdog is connected, for the audit record's `server` field.
SERVER_ADDR = """
SELECT coalesce(host(inet_server_addr()), current_setting('unix_socket_directories'))
       || ':' || current_setting('port')
"""

# High availability: one watchdog acts per server. The key is a fixed constant
# ('pgwd' in ASCII) so every instance contends for the same lock.
LEADER_KEY = 0x70677764
TRY_LEAD = "SELECT pg_try_advisory_lock($1::bigint)"

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

# PgBouncer's admin console (simple query protocol, one command per query). SHOW SOCKETS is
# SHOW CLIENTS and SHOW SERVERS in one answer: the one read per pooler and sweep.
PGBOUNCER_SOCKETS = "SHOW SOCKETS"
PGBOUNCER_CONFIG = "SHOW CONFIG"
# `check --connect`: what a stats_users role must be allowed to run.
PGBOUNCER_CHECKS = ("SHOW POOLS", "SHOW SERVERS", "SHOW CLIENTS", "SHOW SOCKETS")
