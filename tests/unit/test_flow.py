"""Flow control: pause reasons never undo each other; attaching and detaching a server connection."""

from __future__ import annotations

from proxy.relay.flow import FlowControl, Reason, Side


class Transport:
    """Records pause_reading / resume_reading calls (after uvicorn's MockTransport)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closing = False

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closing


def side_with(transport: Transport) -> Side:
    side = Side()
    side.transport = transport
    return side


def test_one_reason_does_not_undo_another() -> None:
    transport = Transport()
    side = side_with(transport)
    side.pause(Reason.PEER_FULL)
    side.pause(Reason.HELD)
    side.resume(Reason.PEER_FULL)
    assert transport.calls == ["pause"]  # still held
    side.resume(Reason.HELD)
    assert transport.calls == ["pause", "resume"]


def test_pausing_twice_for_one_reason_pauses_once() -> None:
    transport = Transport()
    side = side_with(transport)
    side.pause(Reason.HELD)
    side.pause(Reason.HELD)
    side.resume(Reason.PEER_FULL)  # a reason not in force: nothing
    assert transport.calls == ["pause"]
    side.set(Reason.HELD, False)
    side.set(Reason.HELD, False)
    assert transport.calls == ["pause", "resume"]


def test_closing_transport_not_touched() -> None:
    transport = Transport()
    transport.closing = True
    side = side_with(transport)
    side.pause(Reason.HELD)
    side.resume(Reason.HELD)
    assert transport.calls == []
    assert not side.reasons


def wired() -> tuple[FlowControl, Transport, Transport]:
    """Flow control for a client with a server connection attached, both reading."""
    flow = FlowControl()
    client, server = Transport(), Transport()
    flow.client.transport = client
    flow.attach_server(server)
    return flow, client, server


def test_client_full_pauses_the_server_and_server_full_the_client() -> None:
    flow, client, server = wired()
    flow.client_full(True)
    flow.server_full(True)
    assert server.calls == ["pause"] and client.calls == ["pause"]
    flow.client_full(False)
    flow.server_full(False)
    assert server.calls == ["pause", "resume"] and client.calls == ["pause", "resume"]


def test_attach_applies_client_full_to_a_new_server() -> None:
    flow = FlowControl()
    flow.client_full(True)  # no server yet
    server = Transport()
    flow.attach_server(server)
    assert server.calls == ["pause"]
    assert flow.server.reasons == {Reason.PEER_FULL}
    flow.client_full(False)
    assert server.calls == ["pause", "resume"]


def test_attach_of_a_server_while_the_client_reads_freely() -> None:
    flow = FlowControl()
    server = Transport()
    flow.attach_server(server)
    assert server.calls == [] and not flow.server.reasons


def test_detach_resumes_the_server_and_clears_peer_full_of_the_client() -> None:
    flow, client, server = wired()
    flow.client_full(True)
    flow.server_full(True)
    flow.client.pause(Reason.HELD)
    flow.detach_server()
    assert server.calls == ["pause", "resume"]
    assert flow.server.transport is None and not flow.server.reasons
    assert flow.client.reasons == {Reason.HELD}  # the client keeps its own reason
    assert client.calls == ["pause"]
    flow.client.resume(Reason.HELD)
    assert client.calls == ["pause", "resume"]


def test_detach_of_a_reading_server_does_not_resume_it() -> None:
    flow = FlowControl()
    server = Transport()
    flow.attach_server(server)
    flow.detach_server()
    assert server.calls == []


def test_next_server_after_detach_paused_if_client_still_full() -> None:
    flow = FlowControl()
    first, second = Transport(), Transport()
    flow.attach_server(first)
    flow.client_full(True)
    flow.detach_server()
    flow.attach_server(second)
    assert first.calls == ["pause", "resume"]
    assert second.calls == ["pause"]
