"""A login pauses the client's socket only while it is under way after the call that began it
(auth.py): one that ends at once (a parked backend connection taken) costs no stopReading and
startReading, one that waits (a new backend connection, a penalty) holds the socket meanwhile;
either way no command is read before the login's answer."""

from __future__ import annotations

from referral_proxy.testing.fakes import HeldConnector, NoDelayTransport, SessionHarness


class CountingTransport(NoDelayTransport):
    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.pauses += 1
        super().pauseProducing()


def test_a_login_that_ends_at_once_never_pauses_the_socket_and_reads_what_followed_it_after_its_answer():
    client = CountingTransport()
    h = SessionHarness(client=client)  # FakeConnector: the connection is there within the call
    h.to_client()
    h.send(b"L LOGIN alice secret\r\nN NOOP\r\n")
    assert client.pauses == 0 and client.producerState == "producing"
    reply = h.to_client()
    assert reply.startswith(b"L OK [CAPABILITY ")
    assert h.to_backend().endswith(b" NOOP\r\n")  # relayed after the login was answered


def test_a_login_that_waits_pauses_the_socket_until_it_ends():
    client = CountingTransport()
    connector = HeldConnector()
    h = SessionHarness(client=client, connector=connector)
    h.to_client()
    h.send(b"L LOGIN alice secret\r\nN NOOP\r\n")
    assert client.pauses == 1 and client.producerState == "paused"
    assert h.to_client() == b""
    connector.held[0].callback(None)
    h.turns()
    assert client.producerState == "producing"
    assert h.to_client().startswith(b"L OK [CAPABILITY ")
    assert h.to_backend().endswith(b" NOOP\r\n")
