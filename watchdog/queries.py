"""Every SQL statement pg-watchdog runs, in one place so a DBA can read exactly what it does.

Values always travel as parameters; nothing from the config or from a session
is ever formatted into SQL text.
"""

# One statement per sweep: the sessions, the server's clock and its slot limits.
# now() is the statement's start, the same instant pg_stat_activity is read.
SNAPSHOT = """
SELECT a.pid, coalesce(a.backend_type, '') AS backend_type, a.backend_start, a.usename,
       r.rolsuper, a.datname, coalesce(a.application_name, '') AS application_name,
       host(a.client_addr) AS client_addr, a.state, a.state_change,
       a.xact_start, a.query_start, a.query, a.leader_pid,
       s.now, s.own_pid, s.version_num, s.max_connections, s.su_reserved, s.reserved
FROM (SELECT now() AS now,
             pg_backend_pid() AS own_pid,
             current_setting('server_version_num')::int AS version_num,
             current_setting('max_connections')::int AS max_connections,
             current_setting('superuser_reserved_connections')::int AS su_reserved,
             coalesce(current_setting('reserved_connections', true), '0')::int AS reserved) s
LEFT JOIN pg_stat_activity a ON true
LEFT JOIN pg_roles r ON r.oid = a.usesysid
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

# High availability: one watchdog acts per server (per database: advisory locks are
# scoped to the connected database). LEADER_KEY ('pgwd' in ASCII) is the default key;
# the policy file's lock_key overrides it, per deployment.
LEADER_KEY = 0x70677764
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
