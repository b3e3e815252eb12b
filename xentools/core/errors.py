"""Exception types of the protocol core, and the base every xentools error derives from.

Owns: `XentoolsError` (the one base: `rule` and `detail`), the protocol errors with their
local/remote split, and the narrow, documented exceptions raised when bytes, values or calls
break a rule.
Must not: import anything else from xentools (every core module imports this one).

Every error that breaks a rule carries `rule`, a short stable identifier of the rule or the
failed step (for example "segment.last_sect", "xs_wire.payload_too_long" or
"mirror.interrupted"), so that a backend can count violations per rule in its conformance
report and a command can print one line naming it; `str(err)` is "<rule>: <detail>".

Who broke the protocol (as h11 splits it): a LocalProtocolError is ours (a call or a value on
this side, out of order or out of range: a bug or a bad argument here), a RemoteProtocolError
is the peer's (what the other end wrote or did). The codecs of the core parse for both
sides, so they raise plain ProtocolError subclasses; the layer that knows whose bytes they
were (the handshake, the devices) raises the side.
"""

from __future__ import annotations


class XentoolsError(Exception):
    """Base class of every error xentools raises on purpose.

    Made as XentoolsError(rule, detail), str() "<rule>: <detail>"; or, for an error told by
    its message alone (platform failures), XentoolsError(message), with `rule` None and
    `detail` the message.
    """

    rule: str | None = None

    def __init__(self, rule: str, detail: str | None = None) -> None:
        if detail is None:
            super().__init__(rule)
            self.rule, self.detail = None, rule
        else:
            super().__init__(f"{rule}: {detail}")
            self.rule, self.detail = rule, detail


class ProtocolError(XentoolsError, ValueError):
    """Bytes or values received from (or about to be sent to) a peer break a protocol rule.

    `rule` names the rule; `str(err)` is one line: "<rule>: <detail>".
    """

    rule: str


class LocalProtocolError(ProtocolError):
    """This side broke the protocol, or was about to: an event of our own out of order, a
    value our caller gave out of range. The peer is not to blame."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: a state, a key, a request or a response it wrote. The
    side that saw it fails the device or refuses the request, as blkif.h and XSA-376 ask."""


class BlkifError(ProtocolError):
    """A blkif request, response or segment breaks a rule of xen/io/blkif.h."""


class RingError(ProtocolError):
    """Shared ring indices break a rule of xen/io/ring.h (for example an overflowing producer)."""


class XenbusError(ProtocolError):
    """A xenbus state transition is not in the handshake table, or a state is not a state."""


class RemoteXenbusError(XenbusError, RemoteProtocolError):
    """The peer's state is not a xenbus state, or the handshake table has no transition for
    it from our state: the peer broke the handshake."""


class LocalXenbusError(XenbusError, LocalProtocolError):
    """A milestone of our own has no transition from our state, or the Handshake was given
    a role, state or event that is none: this side broke the handshake."""


class FeatureError(ProtocolError):
    """A xenstore key of the blkif handshake is missing or malformed."""


class XsWireError(ProtocolError):
    """An xs_wire frame is malformed: bad header, unknown op, oversize or unterminated payload."""


class VbdError(ProtocolError):
    """A virtual block device name or number is not valid per xen-vbd-interface(7)."""


class GrantDmaError(XentoolsError):
    """The grant-DMA layer was used against its rules (bad tag, buffer that does not fit the
    tag, map in the wrong state). Like ProtocolError it carries `rule` and `detail`."""
