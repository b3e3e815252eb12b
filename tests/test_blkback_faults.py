"""`blkback serve --fault SPEC`: the spec grammar, bad specs refused (one line, exit 2), and
every fault kind served by the real blkback (its own process, software Xen) to the project's
blkfront, which must detect it (the device fails, naming the rule) or survive it (I/O goes on,
what it reports as read is what the backend sent), while the image file is never changed by a
fault and the report's "faults" section counts each firing."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import threading
import time

import pytest

from test_blkback_cli import ENTRY_POINTS, Server, image, new_vbd, one_line, run, xs  # noqa: E402,F401 - shared fixtures

from xentools.core.blkif import (  # noqa: E402
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    X86_64,
    codec_for,
)
from xentools.core.ring import BackRing, FrontRing, SharedRing  # noqa: E402
from xentools.core.xenbus import XenbusState  # noqa: E402
from xentools.devices.blkback_faults import (  # noqa: E402
    CONNECT_KINDS,
    DATA_KINDS,
    GRANT_KINDS,
    KINDS,
    RESPONSE_KINDS,
    FaultSet,
    FaultSpec,
    FaultSpecError,
    parse_fault,
)
from xentools.devices import blkback_faults as faults_module  # noqa: E402
from xentools.devices.blkfront import BlkFront, BlkfrontConfig, BlkfrontError  # noqa: E402
from xentools.devices.blkfront_types import RequestFailed  # noqa: E402
from xentools.devices.toolstack import destroy_vbd  # noqa: E402

SIZE = 1 << 20


# -- the grammar -----------------------------------------------------------------------------------


def test_specs_parse() -> None:
    assert parse_fault("silent") == FaultSpec("silent", text="silent")
    assert parse_fault("unknown-id:every=5,on=read") == FaultSpec(
        "unknown-id", "every", 5, "read", text="unknown-id:every=5,on=read")
    assert parse_fault("error:after=3").trigger == "after"
    assert parse_fault("error:p=0.25").value == 0.25
    assert parse_fault("late:delay=2.5,on=flush").delay == 2.5
    assert parse_fault("error:on=write").trigger == "first"
    assert set(KINDS) == set(RESPONSE_KINDS) | set(DATA_KINDS) | set(GRANT_KINDS) | set(CONNECT_KINDS)


def _fired(spec: str, ops: list[int]) -> list[int]:
    """Which of the responses to `ops` (1-based) the fault changed or dropped."""
    faults = FaultSet([parse_fault(spec)])
    stop = threading.Event()
    changed = []
    for n, op in enumerate(ops, 1):
        out = faults.responses(0, [(n, op, BLKIF_RSP_OKAY)], stop)
        if out != [(n, op, BLKIF_RSP_OKAY)]:
            changed.append(n)
    return changed


def test_unsolicited_halts_its_ring_so_the_fake_cannot_vanish() -> None:
    """The fake response goes in the slot of the frontend's next request. A frontend that
    writes that request before it reads the fake (its submitting thread ahead of its
    completion thread) must not then find an honest answer there under the same rsp_prod
    (the fake gone unseen, as once in CI): the ring serves nothing more after the fake."""
    codec = codec_for(X86_64)
    size = 32
    shared = SharedRing(bytearray(4096), X86_64.entry_size, size)
    front, back = FrontRing.create(shared, None), BackRing(shared, None)
    faults = FaultSet([parse_fault("unsolicited")])
    stop = threading.Event()
    notified = []

    def request(req_id: int) -> bytes:
        slot = bytearray(codec.request_size)
        codec.request_header.pack_into(slot, 0, BLKIF_OP_READ, 0, 0xCA00, req_id, 0)
        return bytes(slot)

    front.put_request(request(7))
    front.push_requests_and_check_notify()
    assert back.unconsumed_requests() == 1 and back.get_request()
    [answer] = faults.responses(0, [(7, BLKIF_OP_READ, BLKIF_RSP_OKAY)], stop)
    back.put_response(codec.response.pack(*answer))
    faults.push(0, back, codec.response.pack, lambda: notified.append(1))
    assert faults.halted(0) and notified and shared.rsp_prod == 2  # the honest answer and the fake
    front.put_request(request(8))  # into the fake's slot, before the fake was read
    front.push_requests_and_check_notify()
    assert back.rsp_prod_pvt == 2  # not rewound: request 8 is never answered in slot 1
    assert front.unconsumed_responses() == 2
    assert codec.response.unpack_from(front.get_response())[0] == 7
    assert codec.response.unpack_from(front.get_response())[0] != 8  # its own request, not an answer
    assert faults.responses(0, [], stop) == [] and faults.halted(0)


def test_triggers() -> None:
    reads = [BLKIF_OP_READ] * 20
    assert _fired("error", reads) == [1]
    assert _fired("error:after=3", reads) == [4]
    assert _fired("error:every=7", reads) == [7, 14]
    assert _fired("error:p=0", reads) == [] and _fired("error:p=1", reads) == list(range(1, 21))
    some = _fired("error:p=0.5", reads * 10)
    assert 60 < len(some) < 140 and some == _fired("error:p=0.5", reads * 10)  # seeded: repeatable
    mixed = [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER] * 3
    assert _fired("error:every=2,on=write", mixed) == [6]  # the 2nd write
    assert _fired("error:every=1,on=flush", mixed) == [3, 4, 7, 8, 11, 12]
    assert _fired("silent:after=1", reads[:3]) == [2]


def test_response_kinds_change_only_what_they_say() -> None:
    stop = threading.Event()

    def one(kind: str) -> tuple[int, int, int]:
        [out] = FaultSet([parse_fault(kind)]).responses(0, [(5, BLKIF_OP_READ, BLKIF_RSP_OKAY)], stop)
        return out

    assert one("error") == (5, BLKIF_OP_READ, BLKIF_RSP_ERROR)
    assert one("bad-status") == (5, BLKIF_OP_READ, 2)
    assert one("wrong-op") == (5, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)
    assert one("unknown-id") == (5 | 1 << 63, BLKIF_OP_READ, BLKIF_RSP_OKAY)
    assert FaultSet([parse_fault("silent")]).responses(0, [(5, 0, 0), (6, 0, 0)], stop) == [(6, 0, 0)]
    # duplicate: 6's place goes to a second copy of another answer of the same push, after it.
    dup = FaultSet([parse_fault("duplicate:after=1")])
    assert dup.responses(0, [(5, 0, 0), (6, 0, 0), (7, 0, 0)], stop) == [(5, 0, 0), (7, 0, 0), (7, 0, 0)]
    [fault] = dup.as_dict()
    assert fault["fired"] == 1 and fault["first"]["request"] == 2
    first = FaultSet([parse_fault("duplicate")])
    assert first.responses(0, [(5, 0, 0), (6, 0, 0)], stop) == [(6, 0, 0), (6, 0, 0)]
    assert first.responses(0, [(7, 0, 0)], stop) == [(7, 0, 0)]  # fired once: honest again


def test_duplicate_holds_an_answer_alone_until_another_comes() -> None:
    stop = threading.Event()
    dup = FaultSet([parse_fault("duplicate")])
    assert dup.responses(0, [(5, 0, 0)], stop) == [] and not dup.due(0)  # held: no partner yet
    assert dup.as_dict()[0]["fired"] == 0  # not sent, not counted
    assert dup.responses(1, [(9, 0, 0)], stop) == [(9, 0, 0)]  # another ring is not held up
    assert dup.responses(0, [(6, 0, 0)], stop) == [(6, 0, 0), (6, 0, 0)]  # 5's place: 6 again
    [fault] = dup.as_dict()
    assert fault["fired"] == 1 and fault["first"]["request"] == 1 and fault["matched"] == 3


def test_duplicate_answers_honestly_after_the_hold_and_stays_armed(monkeypatch) -> None:
    stop = threading.Event()
    monkeypatch.setattr(faults_module, "DUPLICATE_HOLD", 0.05)
    dup = FaultSet([parse_fault("duplicate")])
    assert dup.responses(0, [(5, 0, 0)], stop) == []
    time.sleep(0.06)
    assert dup.due(0)
    assert dup.responses(0, [], stop) == [(5, 0, 0)]  # a frontend with one request in flight
    assert not dup.due(0) and dup.as_dict()[0]["fired"] == 0
    assert dup.responses(0, [(5, 0, 0)], stop) == []  # still armed: the next one is held
    stop.set()  # the queue stops: what is held is answered, nothing stays armed
    assert dup.responses(0, [], stop) == [(5, 0, 0)]
    assert dup.responses(0, [(6, 0, 0)], stop) == [(6, 0, 0)]


def test_duplicate_gives_up_on_a_ring_after_its_holds_found_no_partner(monkeypatch) -> None:
    stop = threading.Event()
    monkeypatch.setattr(faults_module, "DUPLICATE_HOLD", 0.01)
    dup = FaultSet([parse_fault("duplicate")])
    for n in range(faults_module.DUPLICATE_TRIES):  # one request in flight at a time
        assert dup.responses(0, [(n, 0, 0)], stop) == []
        time.sleep(0.02)
        assert dup.responses(0, [], stop) == [(n, 0, 0)]
    assert dup.responses(0, [(7, 0, 0)], stop) == [(7, 0, 0)]  # not held any more
    [fault] = dup.as_dict()
    assert fault["fired"] == 0 and fault["matched"] == faults_module.DUPLICATE_TRIES + 1


BAD_SPECS = [
    ("nope", "unknown kind 'nope'; valid kinds: unknown-id, duplicate"),
    ("error:p=1.5", "p=1.5 is outside 0..1"),
    ("error:p=-0.1", "outside 0..1"),
    ("error:p=nan", "outside 0..1"),
    ("error:every=0", "every=0: the count must be at least 1"),
    ("error:after=0", "at least 1"),
    ("error:after=x", "not a whole number"),
    ("error:", "nothing after ':'"),
    ("error:every", "not KEY=VALUE"),
    ("error:every=2,after=3", "one of after=, every=, p="),
    ("error:on=read,on=write", "on given twice"),
    ("error:on=discard", "on=read, on=write or on=flush"),
    ("error:delay=3", "unknown trigger key 'delay'"),
    ("late:delay=0", "delay=0 is outside"),
    ("corrupt-read:on=write", "would never fire"),
    ("zero-sectors:every=2", "takes no trigger"),
    ("keep-mapped:on=read", "drop on="),
]


@pytest.mark.parametrize("spec,words", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_are_refused(spec, words) -> None:
    with pytest.raises(FaultSpecError) as err:
        parse_fault(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec,words", BAD_SPECS[:5], ids=[b[0] for b in BAD_SPECS[:5]])
def test_bad_specs_are_one_line_and_exit_2_before_serving(tmp_path, xen, xs, spec, words) -> None:
    img = image(tmp_path, "disk.img", SIZE)
    paths = new_vbd(xs, img)
    try:
        result = run("cli", "--sim-dir", xen.root_dir, "--backend-path", paths.backend, "--image", img,
                     "--fault", "error", "--fault", spec)
        one_line(result, words)
        assert result.returncode == 2 and result.stdout == ""
        assert xs.read(f"{paths.backend}/state") == b"1"  # nothing was served, not even InitWait
    finally:
        destroy_vbd(xs, paths)


def test_help_documents_the_grammar_and_every_kind() -> None:
    result = run("cli", "--help")
    text = " ".join(result.stdout.split())
    assert "KIND[:TRIGGER,...]" in text and "after=N" in text and "every=N" in text and "p=X" in text
    assert "fires once, on the first matching request" in text
    for kind in KINDS:
        assert f" {kind} " in text, kind


# -- against the project's blkfront ------------------------------------------------------------------


class Session:
    """A blkback serving `img` with faults, and the project's blkfront attached to it."""

    def __init__(self, xen, xs, paths, img: str, content: bytes, report: str, server: Server) -> None:  # type: ignore[no-untyped-def]
        self.xen, self.xs, self.paths, self.img, self.content = xen, xs, paths, img, content
        self.report_path, self.server = report, server
        self.dev: BlkFront | None = None

    def attach(self, **config) -> BlkFront:  # type: ignore[no-untyped-def]
        fields = {"connect_timeout": 10.0, "request_timeout": 2.0, "close_timeout": 2.0, **config}
        self.dev = BlkFront.attach(self.xen.platform(1), self.paths.frontend, config=BlkfrontConfig(**fields))
        return self.dev

    def expect(self, sector: int, nr: int) -> bytes:
        return self.content[sector * 512 : (sector + nr) * 512]

    def report(self) -> dict:
        with open(self.report_path) as f:
            return json.load(f)

    def faults(self) -> list[dict]:
        return self.report()["faults"]


@contextlib.contextmanager
def served(tmp_path, xen, xs, *faults: str, args: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    content = random.Random(len(faults)).randbytes(SIZE)
    img = image(tmp_path, "disk.img", SIZE, data=content)
    paths = new_vbd(xs, img)
    report = str(tmp_path / "report.json")
    argv = [arg for fault in faults for arg in ("--fault", fault)]
    server = Server(xen, paths.backend, "--image", img, *argv, *args, report=report)
    session = Session(xen, xs, paths, img, content, report, server)
    try:
        yield session
    finally:
        if session.dev is not None:
            session.dev.close()
        rc = server.stop()
        destroy_vbd(xs, paths)
        assert "Traceback" not in server.err, server.err
        assert rc == 0, server.err
        with open(img, "rb") as f:
            assert f.read() == session.content, "a fault changed the image file"


DETECTED = [
    ("unknown-id:after=2", "response.id"),
    ("duplicate:after=2", "response.id"),
    ("wrong-op:after=2", "response.op"),
    ("bad-status:after=2", "response.status"),
    ("rsp-overrun:after=2", "ring.rsp_overflow"),
    ("unsolicited:after=2", "response.id"),
    ("closing:after=2", "backend.closed"),
    ("silent:after=2", "response.timeout"),
    ("late:after=2,delay=4", "response.timeout"),
]


@pytest.mark.parametrize("spec,rule", DETECTED, ids=[d[0].split(":")[0] for d in DETECTED])
def test_blkfront_detects(tmp_path, xen, xs, spec, rule) -> None:
    with served(tmp_path, xen, xs, spec) as s:
        dev = s.attach()
        reads = 0

        def io(dev: BlkFront) -> None:
            nonlocal reads
            # Until the device fails: Closing, and a bad rsp_prod after the honest one, reach
            # the frontend a little after the response that fired them.
            # Two reads one at a time (before the trigger), then eight in flight at a time
            # (two or more on each queue's ring: duplicate repeats another request's answer
            # of the same ring).
            for n in (0, 1, *range(2, 1000, 8)):
                sectors = [(n + k) * 8 % 2000 for k in range(1 if n < 2 else 8)]
                futures = [dev.submit_read(sector, 8) for sector in sectors]
                for sector, future in zip(sectors, futures):
                    assert future.result() == s.expect(sector, 8)
                    reads += 1

        with pytest.raises(BlkfrontError):
            io(dev)
        assert dev.failed is not None and dev.failed[0] == rule, dev.failed
        assert reads >= 1  # the honest requests before the trigger were served honestly
    report = s.report()
    assert report["total"] == 0, report["frontends"]  # the backend's lie is not the frontend's violation
    [fault] = report["faults"]
    assert fault["kind"] == spec.split(":")[0] and fault["fired"] == 1 and fault["first"]["request"] == 3
    assert fault["trigger"].startswith("after=2") and fault["first"]["seconds"] >= 0


def test_grants_kept_mapped_after_the_response_are_detected(tmp_path, xen, xs) -> None:
    with served(tmp_path, xen, xs, "keep-mapped:after=2", args=("--no-persistent",)) as s:
        dev = s.attach()
        reads = 0
        with pytest.raises(BlkfrontError):
            for sector in range(0, 64, 8):
                assert dev.read(sector, 8) == s.expect(sector, 8)
                reads += 1
        assert dev.failed is not None and dev.failed[0] == "grant.still_mapped", dev.failed
        assert reads == 2
    report = s.report()
    assert report["total"] == 0 and report["faults"][0]["fired"] == 1


def test_error_fails_only_that_request(tmp_path, xen, xs) -> None:
    with served(tmp_path, xen, xs, "error:every=3,on=read") as s:
        dev = s.attach()
        outcomes = []
        for sector in range(0, 72, 8):
            try:
                assert dev.read(sector, 8) == s.expect(sector, 8)
                outcomes.append("ok")
            except RequestFailed as err:
                assert err.rule == "response.error"
                outcomes.append("error")
        dev.write(100, b"\x11" * 512)  # writes are not affected (on=read)
        s.content = s.content[: 100 * 512] + b"\x11" * 512 + s.content[101 * 512 :]
        assert dev.failed is None
        assert outcomes == ["ok", "ok", "error"] * 3
    [fault] = s.faults()
    assert fault["matched"] == 9 and fault["fired"] == 3 and fault["first"]["request"] == 3


def test_late_answers_within_the_timeout_are_survived(tmp_path, xen, xs) -> None:
    with served(tmp_path, xen, xs, "late:every=2,delay=0.3") as s:
        dev = s.attach(request_timeout=5.0)
        for sector in range(0, 32, 8):
            assert dev.read(sector, 8) == s.expect(sector, 8)
        assert dev.failed is None
    assert s.faults()[0]["fired"] == 2


def test_an_event_storm_is_survived(tmp_path, xen, xs) -> None:
    with served(tmp_path, xen, xs, "storm:every=2") as s:
        dev = s.attach()
        for sector in range(0, 48, 8):
            assert dev.read(sector, 8) == s.expect(sector, 8)
        dev.write(8, b"\x22" * 4096)
        assert dev.read(8, 8) == b"\x22" * 4096
        assert dev.failed is None
        s.content = s.content[: 8 * 512] + b"\x22" * 4096 + s.content[16 * 512 :]
    assert s.faults()[0]["fired"] == 4


def test_read_without_data_never_shows_older_data(tmp_path, xen, xs) -> None:
    """The lie cannot be seen on the ring; blkfront's pages were cleared (XSA-403), so the
    guest gets zeros, never bytes of an earlier request."""
    with served(tmp_path, xen, xs, "read-no-data:after=1") as s:
        dev = s.attach()
        assert dev.read(0, 8) == s.expect(0, 8)
        assert dev.read(8, 8) == bytes(4096)
        assert dev.read(16, 8) == s.expect(16, 8)
        assert dev.failed is None
    assert s.faults()[0]["fired"] == 1 and s.faults()[0]["first"]["request"] == 2


def test_corrupted_read_data_reaches_the_guest_but_not_the_image(tmp_path, xen, xs) -> None:
    with served(tmp_path, xen, xs, "corrupt-read:every=2") as s:
        dev = s.attach()
        assert dev.read(0, 8) == s.expect(0, 8)
        bad = dev.read(8, 8)
        want = bytearray(s.expect(8, 8))
        for at in range(0, len(want), 512):
            want[at] ^= 0xFF
        assert bad == bytes(want)
        assert dev.failed is None
    assert s.faults()[0]["fired"] == 1


CONNECT = [
    ("bad-ring-order", "max-ring-page-order"),
    ("bad-indirect-segments", "feature-max-indirect-segments"),
    ("bad-queues", "multi-queue-max-queues"),
    ("bad-sector-size", "sector-size"),
    ("zero-sectors", "sectors"),
    ("huge-sectors", "sectors"),
]


@pytest.mark.parametrize("kind,key", CONNECT, ids=[c[0] for c in CONNECT])
def test_absurd_values_at_connect(tmp_path, xen, xs, kind, key) -> None:
    with served(tmp_path, xen, xs, kind) as s:
        try:
            dev = s.attach(connect_timeout=5.0)
        except BlkfrontError as err:
            assert key in str(err), err  # refused, naming the key
            print(f"{kind}: refused: {err}")
        else:  # survived: what it uses is sane
            s.dev = dev
            assert kind != "huge-sectors", "2^64 - 1 sectors must be refused"
            assert dev.failed is None
            print(f"{kind}: survived, {dev.sectors} sectors of {dev.sector_size} bytes")
            if dev.sectors:
                assert dev.read(0, 8) == s.expect(0, 8)
            else:  # an empty disk: nothing reaches the ring
                with pytest.raises(BlkfrontError, match="request.range"):
                    dev.read(0, 8)
    [fault] = s.faults()
    assert fault["fired"] == 1 and fault["trigger"] == "first matching request"


def test_several_faults_and_the_report_keeps_conformance(tmp_path, xen, xs) -> None:
    with served(tmp_path, xen, xs, "error:every=2,on=write", "storm:every=3") as s:
        dev = s.attach()
        for sector in range(0, 32, 8):
            assert dev.read(sector, 8) == s.expect(sector, 8)
        with pytest.raises(RequestFailed):
            for sector in range(0, 32, 8):
                dev.write(sector, s.expect(sector, 8))
        s.server.wait_state(s.xs, s.paths.backend, XenbusState.Connected)
    report = s.report()
    assert [f["kind"] for f in report["faults"]] == ["error", "storm"]
    assert report["faults"][0]["fired"] >= 1 and report["faults"][1]["fired"] >= 1
    mine = report["frontends"][s.paths.frontend]
    assert mine["requests"]["by_operation"]["read"]["direct"] >= 4
    assert report["total"] == 0  # a fault is not the frontend's violation


def test_the_cli_serves_with_faults_and_reports_them(tmp_path, xen, xs) -> None:
    img = image(tmp_path, "disk.img", SIZE)
    paths = new_vbd(xs, img)
    report = str(tmp_path / "report.json")
    proc = subprocess.Popen(
        [*ENTRY_POINTS["cli"], "--sim-dir", xen.root_dir, "--backend-path", paths.backend, "--image", img,
         "--fault", "zero-sectors", "--fault", "error:every=2,on=read", "--report", report],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    dev = None
    try:
        dev = BlkFront.attach(xen.platform(1), paths.frontend, config=BlkfrontConfig(connect_timeout=10))
        assert dev.sectors == 0  # what the guest was told; the image is 1 MiB
    finally:
        if dev is not None:
            dev.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        destroy_vbd(xs, paths)
    assert proc.returncode == 0 and "Traceback" not in err, err
    with open(report) as f:
        faults = json.load(f)["faults"]
    assert [(f["spec"], f["fired"], f["matched"]) for f in faults] == [
        ("zero-sectors", 1, 1), ("error:every=2,on=read", 0, 0)]
    assert faults[1]["trigger"] == "every=2,on=read" and faults[1]["first"] is None


def test_every_kind_has_a_live_test_here() -> None:
    with open(__file__) as f:
        text = f.read()
    live = {spec.split(":")[0] for spec, _ in DETECTED} | {kind for kind, _ in CONNECT}
    live |= {"error", "late", "storm", "read-no-data", "corrupt-read", "keep-mapped"}
    assert live == set(KINDS)
    for kind in live - {spec.split(":")[0] for spec, _ in DETECTED} - {kind for kind, _ in CONNECT}:
        assert f'served(tmp_path, xen, xs, "{kind}' in text, kind
