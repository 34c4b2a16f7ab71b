"""`pg-watchdog advise`: from relief to cure.

command.py is the CLI command; look.py the live look at a target; findings.py the shared
vocabulary (Finding, Window, counting kills); analyse.py composes the findings of leak.py,
timeouts.py, server.py, prepared.py and own.py, all pure functions of audit records and looks.
"""
