"""Exception types of the protocol core.

Owns: the narrow, documented exceptions raised when bytes, values or calls break a rule.
Must not: import anything else from xentools (every core module imports this one).

Every ProtocolError carries `rule`, a short stable identifier of the violated rule (for
example "segment.last_sect" or "xs_wire.payload_too_long"), so that a backend can count
violations per rule in its conformance report, and a message that names the rule.
"""

from __future__ import annotations


class XentoolsError(Exception):
    """Base class of every error xentools raises on purpose."""


class ProtocolError(XentoolsError, ValueError):
    """Bytes or values received from (or about to be sent to) a peer break a protocol rule.

    `rule` names the rule; `str(err)` is one line: "<rule>: <detail>".
    """

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


class BlkifError(ProtocolError):
    """A blkif request, response or segment breaks a rule of xen/io/blkif.h."""


class RingError(ProtocolError):
    """Shared ring indices break a rule of xen/io/ring.h (for example an overflowing producer)."""


class XenbusError(ProtocolError):
    """A xenbus state transition is not in the handshake table."""


class FeatureError(ProtocolError):
    """A xenstore key of the blkif handshake is missing or malformed."""


class XsWireError(ProtocolError):
    """An xs_wire frame is malformed: bad header, unknown op, oversize or unterminated payload."""


class VbdError(ProtocolError):
    """A virtual block device name or number is not valid per xen-vbd-interface(7)."""


class GrantDmaError(XentoolsError):
    """The grant-DMA layer was used against its rules (bad tag, buffer that does not fit the
    tag, map in the wrong state). Like ProtocolError it carries `rule` and `detail`."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail
