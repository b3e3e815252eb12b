"""core.errors: the one error base, its `rule` and `detail`, and the local/remote split
(h11's LocalProtocolError/RemoteProtocolError: "we broke the protocol" vs "the peer did")."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import xentools
from xentools.core.errors import (
    BlkifError,
    LocalProtocolError,
    LocalXenbusError,
    ProtocolError,
    RemoteProtocolError,
    RemoteXenbusError,
    XenbusError,
    XentoolsError,
)
from xentools.core.xenbus import Handshake, Milestone, XenbusState
from xentools.devices.blkback_validate import RequestRejected
from xentools.devices.blkfront_queue import Violation
from xentools.platform.interface import XenstoreError


def test_rule_and_detail_make_one_line():
    err = XentoolsError("segment.last_sect", "last_sect 9 is past the page")
    assert (err.rule, err.detail, str(err)) == (
        "segment.last_sect", "last_sect 9 is past the page", "segment.last_sect: last_sect 9 is past the page")


def test_an_error_told_by_its_message_has_no_rule():
    err = XenstoreError("xenstore: /a: connection closed", errno_name=None)
    assert isinstance(err, XentoolsError)
    assert (err.rule, err.detail, str(err)) == (None, "xenstore: /a: connection closed", "xenstore: /a: connection closed")


def test_the_peer_breaking_the_handshake_is_remote():
    front = Handshake("frontend", XenbusState.Connected, XenbusState.Connected)
    with pytest.raises(RemoteXenbusError) as info:
        front.peer_changed(XenbusState.InitWait)
    assert isinstance(info.value, RemoteProtocolError) and isinstance(info.value, XenbusError)
    assert not isinstance(info.value, LocalProtocolError)
    assert info.value.rule == "xenbus.frontend.Connected->InitWait"
    with pytest.raises(RemoteXenbusError, match="xenbus.state.unknown"):
        front.peer_changed(99)


def test_our_own_milestone_out_of_order_is_local():
    back = Handshake("backend", XenbusState.InitWait, XenbusState.Initialising)
    with pytest.raises(LocalXenbusError) as info:
        back.milestone(Milestone.rings_granted)
    assert isinstance(info.value, LocalProtocolError) and not isinstance(info.value, RemoteProtocolError)
    assert info.value.rule == "xenbus.backend.InitWait->rings_granted"
    with pytest.raises(LocalXenbusError, match="xenbus.role.unknown"):
        Handshake("toolstack")


def test_what_a_device_sees_the_peer_do_is_remote():
    violation = Violation("response.id", "response id 7 is not in flight")
    assert isinstance(violation, RemoteProtocolError)
    assert (violation.rule, str(violation)) == ("response.id", "response.id: response id 7 is not in flight")
    rejected = RequestRejected("segment.last_sect", "last_sect 9 > 7")
    assert isinstance(rejected, RemoteProtocolError) and isinstance(rejected, BlkifError)
    assert rejected.rule == "segment.last_sect"


def _error_classes() -> list[type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(xentools.__path__, "xentools."):
        if info.name.endswith(".__main__"):
            continue  # runs the CLI
        module = importlib.import_module(info.name)  # the package imports where Xen is absent
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return sorted(found.values(), key=lambda c: f"{c.__module__}.{c.__name__}")


def test_every_error_of_xentools_derives_from_the_one_base():
    classes = _error_classes()
    assert len(classes) > 20, classes
    outside = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, XentoolsError)]
    assert not outside, outside
    # Every protocol error takes (rule, detail) and keeps them.
    for cls in classes:
        if issubclass(cls, ProtocolError) and cls is not RequestRejected:
            err = cls("some.rule", "what happened")
            assert (err.rule, err.detail) == ("some.rule", "what happened"), cls
