"""A client session's phase (RFC 3501 section 3, SELECTED apart): its own module, so that what
looks at a session (stayalive.py) compares members, not names, without importing session.py."""

from __future__ import annotations

from enum import Enum

__all__ = ["Phase"]


class Phase(Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    LOGOUT = "logout"

    __hash__ = object.__hash__  # identity, in C (see flow.Block)
