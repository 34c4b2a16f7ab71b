"""The closed vocabularies of the policy file: the session states a policy names, its actions.

str-valued enums: a member equals, prints and serialises (JSON) as its value.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """A session state as pg_stat_activity.state spells it."""

    IDLE = "idle"
    IDLE_IN_TRANSACTION = "idle in transaction"
    IDLE_IN_TRANSACTION_ABORTED = "idle in transaction (aborted)"
    ACTIVE = "active"
    FASTPATH = "fastpath function call"


IN_TRANSACTION = (State.IDLE_IN_TRANSACTION, State.IDLE_IN_TRANSACTION_ABORTED)
RUNNING = frozenset({State.ACTIVE, State.FASTPATH})


class Signal(StrEnum):
    """What a policy does to a session: pg_terminate_backend or pg_cancel_backend."""

    TERMINATE = "terminate"
    CANCEL = "cancel"
