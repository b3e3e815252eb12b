"""Tests of xentools.core.xenbus: the states against xenbus.h, parse_state, the handshake
table cell by cell, and a frontend and a backend driven against each other through a fake
xenstore whose watches may coalesce writes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentools.core import xenbus
from xentools.core.errors import FeatureError, ProtocolError, XenbusError
from xentools.core.xenbus import (
    HANDSHAKE_TABLE,
    ROLES,
    Action,
    Handshake,
    Milestone,
    Step,
    XenbusState,
    format_table,
    parse_state,
)

S = XenbusState
M = Milestone
ALL_EVENTS: list[XenbusState | Milestone] = [*XenbusState, *Milestone]


def _raises(exc: type[ProtocolError], rule: str):
    return pytest.raises(exc, match=f"^{re.escape(rule)}: ")


# --- states and parse_state ---------------------------------------------------------------------


def test_states_match_xenbus_h() -> None:
    header = Path("/usr/include/xen/io/xenbus.h").read_text()
    found = {
        name: int(value) for name, value in re.findall(r"XenbusState(\w+)\s*=\s*(\d+)", header)
    }
    assert found == {state.name: state.value for state in XenbusState}


@pytest.mark.parametrize("state", list(XenbusState))
def test_parse_state_str_and_bytes(state: XenbusState) -> None:
    assert parse_state(str(state.value)) is state
    assert parse_state(str(state.value).encode()) is state


def test_parse_state_missing_node_is_unknown() -> None:
    assert parse_state(None) is XenbusState.Unknown


@pytest.mark.parametrize(
    "raw", ["", "4\n", " 4", "4 ", "+4", "-1", "4x", "0x4", "\u0664", b"\xff", b"4\x00", "four"]
)
def test_parse_state_malformed(raw: str | bytes) -> None:
    with _raises(FeatureError, "state.malformed"):
        parse_state(raw)


@pytest.mark.parametrize("raw", ["9", "10", b"255", "4294967296", "9" * 5000])
def test_parse_state_unknown(raw: str | bytes) -> None:
    with _raises(FeatureError, "state.unknown"):
        parse_state(raw)


def test_parse_state_leading_zero_is_decimal() -> None:
    assert parse_state("04") is XenbusState.Connected


# --- the table, cell by cell --------------------------------------------------------------------


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        row = HANDSHAKE_TABLE["frontend"][S.Connected]
        row[S.InitWait] = xenbus.Transition()  # type: ignore[index]


def test_docstring_quotes_the_table() -> None:
    for role in ROLES:
        assert format_table(role) in (xenbus.__doc__ or "")


def test_table_invariants() -> None:
    for role in ROLES:
        table = HANDSHAKE_TABLE[role]
        for own, row in table.items():
            # Either side may close at any time: every own state answers the peer closing,
            # and a local error or close request.
            for event in (S.Closing, S.Closed, M.error, M.close_requested):
                assert event in row, (role, own, event)
            for event, cell in row.items():
                # Only milestones recheck; a recheck lands in a state with a row.
                assert not (cell.recheck and isinstance(event, XenbusState))
                assert cell.new_state is None or cell.new_state in table
                assert all(isinstance(action, Action) for action in cell.actions)
            # Reconfiguring is not part of blkif.
            assert S.Reconfiguring not in row and S.Reconfigured not in row
    # Frontends never write InitWait; backends never Initialised (this backend does not
    # bypass InitWait), and both start at Initialising.
    assert S.InitWait not in HANDSHAKE_TABLE["frontend"]
    assert S.Initialised not in HANDSHAKE_TABLE["backend"]
    for role in ROLES:
        assert S.Unknown not in HANDSHAKE_TABLE[role]
        assert S.Initialising in HANDSHAKE_TABLE[role]


def _expected(
    role: str, own: XenbusState, peer: XenbusState, event
) -> tuple[Step, XenbusState, XenbusState] | str:
    """What the table says for (own, peer, event): the step and the new (own, peer) states,
    or the rule of the error."""
    table = HANDSHAKE_TABLE[role]
    cell = table[own].get(event)
    name = event.name if isinstance(event, XenbusState) else event.value
    if cell is None:
        return f"xenbus.{role}.{own.name}->{name}"
    new_peer = event if isinstance(event, XenbusState) else peer
    new_own = cell.new_state or own
    actions = cell.actions
    write = cell.new_state
    if cell.recheck:
        again = table[new_own].get(new_peer)
        if again is None:
            return f"xenbus.{role}.{new_own.name}->{new_peer.name}"
        actions += again.actions
        if again.new_state is not None:
            write = new_own = again.new_state
    return Step(actions, write), new_own, new_peer


@pytest.mark.parametrize("role", ROLES)
def test_every_state_event_pair_is_in_the_table_or_raises(role: str) -> None:
    checked = refused = 0
    for own in XenbusState:
        for peer in XenbusState:
            if own not in HANDSHAKE_TABLE[role]:
                with _raises(XenbusError, f"xenbus.{role}.state"):
                    Handshake(role, own, peer)
                continue
            for event in ALL_EVENTS:
                machine = Handshake(role, own, peer)
                expected = _expected(role, own, peer, event)
                if isinstance(expected, str):
                    with _raises(XenbusError, expected):
                        machine.handle(event)
                    assert (machine.state, machine.peer_state) == (own, peer)  # unchanged
                    refused += 1
                else:
                    step, new_own, new_peer = expected
                    assert machine.handle(event) == step
                    assert (machine.state, machine.peer_state) == (new_own, new_peer)
                    checked += 1
    assert checked and refused


def test_error_rule_names_state_and_event() -> None:
    machine = Handshake("frontend", S.Connected, S.Connected)
    with _raises(XenbusError, "xenbus.frontend.Connected->InitWait") as info:
        machine.peer_changed(S.InitWait)
    assert info.value.rule == "xenbus.frontend.Connected->InitWait"
    assert machine.state is S.Connected and machine.peer_state is S.Connected
    with _raises(XenbusError, "xenbus.backend.Connected->InitWait"):
        Handshake("backend", S.Connected).peer_changed(S.InitWait)
    with _raises(XenbusError, "xenbus.backend.InitWait->rings_granted"):
        Handshake("backend", S.InitWait).milestone("rings_granted")
    with _raises(XenbusError, "xenbus.frontend.Initialising->Reconfiguring"):
        Handshake("frontend").peer_changed(7)


def test_bad_inputs() -> None:
    with _raises(XenbusError, "xenbus.role.unknown"):
        Handshake("sideways")
    with _raises(XenbusError, "xenbus.frontend.state"):
        Handshake("frontend", S.InitWait)
    with _raises(XenbusError, "xenbus.state.unknown"):
        Handshake("frontend", S.Initialising, 4)  # type: ignore[arg-type]
    machine = Handshake("frontend")
    for bad in (9, -1, True, "4", None):
        with _raises(XenbusError, "xenbus.state.unknown"):
            machine.peer_changed(bad)  # type: ignore[arg-type]
    with _raises(XenbusError, "xenbus.milestone.unknown"):
        machine.milestone("bogus")
    with _raises(XenbusError, "xenbus.event.unknown"):
        machine.handle(4)  # type: ignore[arg-type]
    assert machine.state is S.Initialising and machine.peer_state is S.Unknown


def test_plain_ints_and_strings_are_accepted_as_events() -> None:
    machine = Handshake("backend")
    assert machine.milestone("start") == Step((Action.publish_features,), None)
    assert machine.milestone(M.features_published) == Step((), S.InitWait)
    assert machine.peer_changed(3) == Step((Action.map_rings, Action.publish_disk_info), None)
    assert machine.peer_state is S.Initialised
    assert machine.milestone("rings_mapped") == Step((), S.Connected)


def test_allowed_events_and_repr() -> None:
    machine = Handshake("backend", S.InitWait, S.Initialising)
    assert set(machine.allowed_events()) == set(HANDSHAKE_TABLE["backend"][S.InitWait])
    assert "InitWait" in repr(machine) and "backend" in repr(machine)


# --- single-ended behaviours --------------------------------------------------------------------


def test_frontend_recheck_after_backend_jumped_to_connected() -> None:
    # Backend went Initialising -> ... -> Connected while we looked away.
    machine = Handshake("frontend")
    assert machine.peer_changed(S.Connected) == Step(
        (Action.read_backend_features_and_connect,), None
    )
    # The backend will not write Connected again: the recheck reads the disk info now.
    assert machine.milestone(M.rings_granted) == Step((Action.read_disk_info,), S.Initialised)
    assert machine.milestone(M.disk_info_read) == Step((), S.Connected)


def test_backend_recheck_maps_a_frontend_that_did_not_wait() -> None:
    # blkif.h: "A frontend may transition to XenbusStateInitialised without waiting for the
    # backend to enter XenbusStateInitWait."
    machine = Handshake("backend")
    assert machine.peer_changed(S.Initialised) == Step((), None)
    assert machine.milestone(M.start) == Step((Action.publish_features,), None)
    assert machine.milestone(M.features_published) == Step(
        (Action.map_rings, Action.publish_disk_info), S.InitWait
    )
    assert machine.milestone(M.rings_mapped) == Step((), S.Connected)


def test_backend_recheck_sees_a_frontend_that_closed_meanwhile() -> None:
    machine = Handshake("backend", S.Closed, S.Initialising)
    assert machine.peer_changed(S.Initialising) == Step((Action.publish_features,), None)
    machine.peer_changed(S.Closed)
    assert machine.milestone(M.features_published) == Step((Action.disconnect,), S.Closed)
    assert machine.state is S.Closed


def test_resize_is_connected_written_again() -> None:
    backend = Handshake("backend", S.Connected, S.Connected)
    assert backend.milestone(M.resized) == Step((Action.publish_disk_info,), S.Connected)
    frontend = Handshake("frontend", S.Connected, S.Connected)
    assert frontend.peer_changed(S.Connected) == Step((Action.read_disk_info,), None)
    assert frontend.milestone(M.disk_info_read) == Step((), None)
    assert frontend.state is S.Connected


def test_frontend_initialising_frontend_ignores_a_stale_closed_backend() -> None:
    machine = Handshake("frontend")
    assert machine.peer_changed(S.Closed) == Step((), None)
    assert machine.peer_changed(S.InitWait) == Step(
        (Action.read_backend_features_and_connect,), None
    )


def test_unknown_peer_tears_down_only_after_it_existed() -> None:
    assert Handshake("backend").peer_changed(S.Unknown) == Step((), None)
    assert Handshake("frontend").peer_changed(S.Unknown) == Step((), None)
    assert Handshake("backend", S.Connected).peer_changed(S.Unknown) == Step(
        (Action.disconnect, Action.teardown), None
    )
    assert Handshake("frontend", S.Closed).peer_changed(S.Unknown) == Step((Action.teardown,), None)


# --- two ends through a fake xenstore -----------------------------------------------------------

MILESTONE_AFTER = {
    Action.publish_features: M.features_published,
    Action.read_backend_features_and_connect: M.rings_granted,
    Action.map_rings: M.rings_mapped,
    Action.read_disk_info: M.disk_info_read,
}


class Store:
    """The two `state` nodes; each write fires the other end's watch."""

    def __init__(self, coalesce: bool) -> None:
        self.coalesce = coalesce
        self.node = {"frontend": S.Initialising, "backend": S.Initialising}
        # A watch fires once when registered, with the current value.
        self.pending: dict[str, list[XenbusState | None]] = {"frontend": [None], "backend": [None]}
        self.history: list[tuple[str, XenbusState]] = []

    def write(self, role: str, state: XenbusState) -> None:
        self.node[role] = state
        self.history.append((role, state))
        watcher = "backend" if role == "frontend" else "frontend"
        if self.coalesce:
            self.pending[watcher] = [None]  # only "it changed": the reader sees the latest
        else:
            self.pending[watcher].append(state)

    def remove(self, role: str) -> None:
        self.node[role] = S.Unknown
        watcher = "backend" if role == "frontend" else "frontend"
        self.pending[watcher].append(None)

    def take(self, watcher: str) -> XenbusState | None:
        """The value the watcher reads for one fired watch, or None if none fired."""
        if not self.pending[watcher]:
            return None
        value = self.pending[watcher].pop(0)
        peer = "backend" if watcher == "frontend" else "frontend"
        return self.node[peer] if value is None else value


class End:
    """A device: carries out steps, reports milestones, logs actions."""

    def __init__(self, role: str, store: Store) -> None:
        self.role = role
        self.store = store
        self.machine = Handshake(role)
        self.log: list[str] = []

    def carry_out(self, step: Step) -> None:
        while True:
            milestones = {MILESTONE_AFTER[a] for a in step.actions if a in MILESTONE_AFTER}
            assert len(milestones) <= 1
            self.log.extend(step.actions)
            if step.new_state is not None:
                self.store.write(self.role, step.new_state)
                self.log.append(f"write {step.new_state.name}")
            if not milestones:
                return
            step = self.machine.milestone(milestones.pop())

    def local(self, milestone: Milestone) -> None:
        self.carry_out(self.machine.milestone(milestone))

    def deliver(self) -> bool:
        value = self.store.take(self.role)
        if value is None:
            return False
        self.carry_out(self.machine.peer_changed(value))
        return True


def _pair(coalesce: bool) -> tuple[Store, End, End]:
    store = Store(coalesce)
    front, back = End("frontend", store), End("backend", store)
    back.local(M.start)
    return store, front, back


def _settle(front: End, back: End, order: Callable[[], int] | None = None) -> None:
    ends = (front, back)
    for _ in range(200):
        if order is None:
            moved = [end.deliver() for end in ends]
            if not any(moved):
                return
        else:
            first = order()
            if not (ends[first].deliver() or ends[1 - first].deliver()):
                return
    raise AssertionError("the handshake did not settle")


@pytest.mark.parametrize("coalesce", [False, True])
def test_pair_connects(coalesce: bool) -> None:
    store, front, back = _pair(coalesce)
    _settle(front, back)
    assert front.machine.state is S.Connected and back.machine.state is S.Connected
    assert front.machine.peer_state is S.Connected and back.machine.peer_state is S.Connected
    assert front.log == [
        "read_backend_features_and_connect",
        "write Initialised",
        "read_disk_info",
        "write Connected",
    ]
    assert back.log == [
        "publish_features",
        "write InitWait",
        "map_rings",
        "publish_disk_info",
        "write Connected",
    ]
    assert store.history == [
        ("backend", S.InitWait),
        ("frontend", S.Initialised),
        ("backend", S.Connected),
        ("frontend", S.Connected),
    ]


@settings(max_examples=60, deadline=None)
@given(coalesce=st.booleans(), choices=st.lists(st.integers(0, 1), min_size=1, max_size=40))
def test_pair_connects_under_any_delivery_order(coalesce: bool, choices: list[int]) -> None:
    _store, front, back = _pair(coalesce)
    queue = list(choices)
    _settle(front, back, order=lambda: queue.pop(0) if queue else 0)
    assert (front.machine.state, back.machine.state) == (S.Connected, S.Connected)
    assert front.log.count("read_backend_features_and_connect") == 1
    assert back.log.count("map_rings") == 1
    assert front.log[-2:] == ["read_disk_info", "write Connected"]


@pytest.mark.parametrize("coalesce", [False, True])
@pytest.mark.parametrize("closer", ["frontend", "backend"])
@pytest.mark.parametrize("why", [M.close_requested, M.error])
def test_pair_closes(coalesce: bool, closer: str, why: Milestone) -> None:
    store, front, back = _pair(coalesce)
    _settle(front, back)
    (front if closer == "frontend" else back).local(why)
    _settle(front, back)
    assert (front.machine.state, back.machine.state) == (S.Closed, S.Closed)
    assert "disconnect" in front.log and "disconnect" in back.log
    assert "teardown" not in front.log + back.log
    if why is M.close_requested and closer == "backend":
        # The backend keeps its rings mapped until the frontend is Closed, so the frontend
        # never revokes a grant the backend still maps (XSA-396).
        frontend_closed = store.history.index(("frontend", S.Closed))
        backend_closed = store.history.index(("backend", S.Closed))
        assert frontend_closed < backend_closed
        assert back.log.index("disconnect") > back.log.index("write Closing")


@pytest.mark.parametrize("coalesce", [False, True])
def test_pair_reconnects_after_close(coalesce: bool) -> None:
    _store, front, back = _pair(coalesce)
    _settle(front, back)
    front.local(M.close_requested)
    _settle(front, back)
    assert (front.machine.state, back.machine.state) == (S.Closed, S.Closed)
    front.local(M.reconnect)
    _settle(front, back)
    assert (front.machine.state, back.machine.state) == (S.Connected, S.Connected)
    assert front.log.count("read_backend_features_and_connect") == 2
    assert back.log.count("publish_features") == 2 and back.log.count("map_rings") == 2


@pytest.mark.parametrize("coalesce", [False, True])
def test_pair_resize(coalesce: bool) -> None:
    _store, front, back = _pair(coalesce)
    _settle(front, back)
    back.local(M.resized)
    _settle(front, back)
    assert (front.machine.state, back.machine.state) == (S.Connected, S.Connected)
    assert front.log.count("read_disk_info") == 2
    assert back.log.count("publish_disk_info") == 2


def test_pair_teardown_when_toolstack_removes_the_frontend() -> None:
    store, front, back = _pair(False)
    _settle(front, back)
    store.remove("frontend")
    _settle(front, back)
    assert back.log[-2:] == ["disconnect", "teardown"]


def test_frontend_that_did_not_wait_for_initwait_still_connects() -> None:
    store = Store(coalesce=True)
    front, back = End("frontend", store), End("backend", store)
    # The frontend connects with default parameters before the backend has even started.
    front.carry_out(front.machine.milestone(M.rings_granted))
    _settle(front, back)  # the backend, still Initialising, sees Initialised and waits
    assert back.machine.state is S.Initialising
    back.local(M.start)
    _settle(front, back)
    assert (front.machine.state, back.machine.state) == (S.Connected, S.Connected)
    assert back.log.count("map_rings") == 1


def test_backend_restart_under_a_connected_frontend_is_refused() -> None:
    machine = Handshake("frontend", S.Connected, S.Connected)
    for state in (S.Initialising, S.InitWait, S.Initialised):
        with _raises(XenbusError, f"xenbus.frontend.Connected->{state.name}"):
            machine.peer_changed(state)
    # The device's answer to the error closes in order.
    assert machine.milestone(M.error) == Step((Action.disconnect,), S.Closing)
