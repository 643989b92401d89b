"""What a backend connection says and fails with: its errors, the credentials it logs in with, and
the responses of an internal command (values only; backend.py speaks the protocol)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .imap.response import ResponseStart

__all__ = ["BackendError", "BackendUnavailable", "AuthenticationFailed", "Credentials", "UntaggedResponse", "Tagged"]


class BackendError(Exception):
    """A backend could not serve the request; str() is safe to show a client."""


class BackendUnavailable(BackendError):
    """Connecting, TLS or the greeting failed: the client gets NO [UNAVAILABLE]."""


class AuthenticationFailed(BackendError):
    """The backend refused the credentials; carries its tagged response."""

    def __init__(self, response: Tagged) -> None:
        super().__init__(response.start.text.decode("utf-8", "replace"))
        self.response = response


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who to log in as. `password` never appears in a log or a repr."""

    user: str
    password: str = field(repr=False)
    authzid: str = ""  # SASL PLAIN authorization identity (master-user logins)


@dataclass(frozen=True)
class UntaggedResponse:
    """One whole untagged response captured by an internal command."""

    start: ResponseStart
    fragments: tuple[bytes, ...]  # Line.data of each fragment (the first one includes "* NAME")
    literals: tuple[bytes, ...]  # the literal after each fragment but the last
    raw: bytes  # the response exactly as received, CRLF included

    @property
    def arguments(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """(fragments, literals) with the first fragment cut to what follows the name."""
        return (self.start.rest,) + self.fragments[1:], self.literals


@dataclass(frozen=True)
class Tagged:
    """The completion of one internal command."""

    start: ResponseStart
    raw: bytes  # the tagged line with the proxy's tag, without CRLF
    responses: tuple[UntaggedResponse, ...] = ()  # untagged responses received meanwhile

    @property
    def ok(self) -> bool:
        return self.start.status == "OK"
