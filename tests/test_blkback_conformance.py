"""The conformance report's bookkeeping: every frontend appears, requests are counted by
operation with their segments and bytes, the rules exercised follow from what was accepted,
and the rule lists stay in step with blkback_validate's rule table."""

from __future__ import annotations

import json
import threading

from xentools.core.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
)
from xentools.devices.blkback_conformance import HANDSHAKE_RULES, REQUEST_RULES, SCHEMA, ConformanceReport
from xentools.devices.blkback_validate import RULES

FE = "/local/domain/1/device/vbd/51712"


def test_request_rules_name_only_real_rules_and_cover_every_request_rule():
    named = {rule for rules in REQUEST_RULES.values() for rule in rules}
    assert named - set(RULES) == {"ring.req_overflow"}
    # A rule added to blkback_validate must be placed in the lists of the requests it checks.
    assert set(RULES) - named == set()
    assert all(rule.startswith("frontend.") for rule in HANDSHAKE_RULES)


def test_a_frontend_is_reported_before_it_connects():
    report = ConformanceReport("/b")
    report.frontend(FE)
    data = report.as_dict()
    assert data["schema"] == SCHEMA and data["total"] == 0 and data["requests"] == 0
    mine = data["frontends"][FE]
    assert mine["connects"] == 0 and mine["ended"] == "never connected" and mine["violations"] == {}


def test_requests_segments_bytes_and_rules_exercised():
    report = ConformanceReport("/b")
    log = report.frontend(FE)
    log.connected({"queues": 2})
    threads = [threading.Thread(target=lambda: [log.accepted(BLKIF_OP_READ, BLKIF_OP_READ, 2, 8192)
                                                for _ in range(500)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.accepted(BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, 16, 65536)
    log.accepted(BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_FLUSH_DISKCACHE, 0, 0)
    log.accepted(BLKIF_OP_DISCARD, BLKIF_OP_DISCARD, 0, 4096)
    log.rejected(BLKIF_OP_DISCARD)
    log.record("discard.secure_not_advertised", "discard.secure_not_advertised: request 7")
    log.disconnected("frontend went to Closed")
    data = json.loads(report.to_json())
    mine = data["frontends"][FE]
    ops = mine["requests"]["by_operation"]
    assert ops["read"] == {"direct": 2000, "indirect": 0, "rejected": 0, "segments": 4000, "bytes": 2000 * 8192}
    assert ops["write"]["indirect"] == 1 and ops["write"]["bytes"] == 65536
    assert ops["flush"]["direct"] == 1 and ops["discard"] == {"direct": 1, "indirect": 0, "rejected": 1,
                                                               "segments": 0, "bytes": 4096}
    assert mine["requests"] == {"checked": 2004, "accepted": 2003, "rejected": 1, "by_operation": ops}
    assert mine["bytes"] == {"read": 2000 * 8192, "written": 65536, "discarded": 4096}
    assert mine["segments"] == 4016
    rules = mine["rules_exercised"]
    assert rules["request.op"] == 2003 and rules["segment.last_sect"] == 2001
    assert rules["indirect.too_many_segments"] == 1 and rules["request.flush_not_advertised"] == 1
    assert rules["discard.secure_not_advertised"] == 2  # passed once, broken once
    assert rules["frontend.ring-ref"] == 1
    assert mine["violations"] == {"discard.secure_not_advertised": 1} and data["total"] == 1
    assert (mine["connects"], mine["disconnects"], mine["ended"]) == (1, 1, "frontend went to Closed")
    assert report.violations() == {FE: {"discard.secure_not_advertised": 1}} and report.total() == 1
