"""blkfront against a hostile backend in its own process (tests/hostile_backend.py).

Hundreds of sessions, each with its own randomized mischief: malformed responses (bad ids,
duplicates, wrong operations, garbage statuses, responses for requests never sent, rsp_prod
jumping past the ring or moving back, garbage data behind an error or a bad response, a
backend that goes silent), event storms, bad xenstore values (sectors, sector-size, feature
keys, ring order, queues, state) and a backend that never reaches InitWait. Together well over
a thousand malformed messages per run. The frontend must never crash or hang, every failure
must be a BlkfrontError, every read reported as a success must hold exactly the known
content, and a session that received a fatal message must end with the device failed.
"""

from __future__ import annotations

import random
import time

from hostile_backend import FATAL_KINDS, known_data, make_vbd, remove_vbd

from xentools.devices.blkfront import BlkFront, BlkfrontConfig, BlkfrontError, ConnectTimeout

SECTORS = 4096
SESSIONS = 400
MIN_MALFORMED = 1000  # counted without the events of storms

BAD_KEYS = [
    ("sectors", "abc"), ("sectors", "-1"), ("sectors", ""), ("sectors", "1" * 30), ("sectors", "99999999"),
    ("sectors", "0x10"), ("sector-size", "0"), ("sector-size", "513"), ("sector-size", "abc"),
    ("sector-size", "8192"), ("sector-size", "1024"), ("max-ring-page-order", "99"),
    ("max-ring-page-order", "x"), ("max-ring-page-order", " 2"), ("multi-queue-max-queues", "0"),
    ("multi-queue-max-queues", "1000"), ("multi-queue-max-queues", "q"),
    ("feature-max-indirect-segments", "abc"), ("feature-max-indirect-segments", "100000"),
    ("feature-max-indirect-segments", "5"), ("feature-persistent", "2"),
    ("feature-flush-cache", "on"), ("feature-discard", "11"), ("info", "x"), ("info", "4294967296"),
    ("state", "9"), ("state", "abc"), ("state", "-4"),
]


def _random_offer(rng: random.Random) -> dict:
    return {
        "max_ring_page_order": rng.randint(0, 4),
        "max_queues": rng.randint(1, 4),
        "max_indirect_segments": rng.choice([0, 32, 256]),
        "persistent": rng.random() < 0.6,
        "indirect_rsp_op": rng.random() < 0.3,
    }


def _random_config(rng: random.Random, **extra) -> BlkfrontConfig:
    fields = {
        "ring_page_order": rng.randint(0, 2),
        "num_queues": rng.randint(1, 3),
        "max_indirect_segments": rng.choice([0, 64, 256]),
        "persistent": rng.random() < 0.7,
        "protocol": rng.choice(["x86_64-abi", "x86_32-abi"]),
        "connect_timeout": 3.0,
        "request_timeout": 0.5,
        "close_timeout": 2.0,
    }
    return BlkfrontConfig(**{**fields, **extra})


def _check_io(dev: BlkFront, rng: random.Random, seed: int, count: int) -> tuple[int, int]:
    """Submit `count` reads and writes at once; every success must be exact. Returns
    (successes, failures)."""
    ops = []
    ss = dev.sector_size  # the published geometry (odd values are served as published)
    sectors = min(dev.sectors, SECTORS * 512 // ss)
    with dev.batch():
        for _ in range(count):
            sector = rng.randrange(sectors - 1)
            nr = min(rng.choice([1, 8, 16, 40, 200, 300]), sectors - sector)
            try:
                if rng.random() < 0.25:
                    # Writing the known content back keeps the image's content known.
                    fut = dev.submit_write(sector, known_data(seed, sector * ss, nr * ss))
                    ops.append((fut, None))
                else:
                    ops.append((dev.submit_read(sector, nr), (sector, nr)))
            except BlkfrontError:
                ops.append((None, None))  # the device already failed: refused, not lost
    good = bad = 0
    for fut, read in ops:
        if fut is None:
            bad += 1
            continue
        try:
            result = fut.result(10)  # bounded: a hang fails the test here
        except BlkfrontError:
            bad += 1
            continue
        good += 1
        if read is not None:
            sector, nr = read
            assert result == known_data(seed, sector * ss, nr * ss), "wrong data returned as success"
    return good, bad


def test_hostile_backend(xen, backend, xs0):
    rng = random.Random(20240531)
    started = time.monotonic()
    malformed = 0
    kinds: dict[str, int] = {}
    sessions = fatal_sessions = connect_failures = 0
    stalls_left = 2
    devid = 100
    for _ in range(SESSIONS):
        devid += 1
        seed = rng.getrandbits(32)
        roll = rng.random()
        offer = _random_offer(rng)
        hostile = None
        stall = False
        if stalls_left and roll < 0.02:
            stalls_left -= 1
            stall = True
            offer["stall_in"] = "Initialising"
        elif roll < 0.15:
            key, value = rng.choice(BAD_KEYS)
            offer["bad_keys"] = {key: value}
        else:
            fatal = rng.choice(FATAL_KINDS) if rng.random() < 0.97 else None
            if fatal == "silent" and rng.random() < 0.8:
                fatal = "bad_id"  # a silent backend costs a request timeout: keep them rare
            hostile = {
                "seed": seed,
                "honest": rng.randint(0, 5),
                "nonfatal": [rng.choice(["storm", "error_garbage", "eopnotsupp"]) for _ in range(rng.randint(0, 5))],
                "fatal": fatal,
                "extra": rng.randint(0, 5),
            }
        be, fe = make_vbd(xs0, backend_domid=0, frontend_domid=1, devid=devid)
        backend.serve(be, offer=offer, image={"sectors": SECTORS, "seed": seed}, hostile=hostile, session_timeout=15)
        config = _random_config(rng, **({"connect_timeout": 0.3} if stall else {}))
        dev = None
        try:
            dev = BlkFront.attach(xen.platform(1), devid, config=config)
        except ConnectTimeout as err:
            assert stall, f"unexpected connect timeout: {err}"
            assert "Initialising" in str(err)
            connect_failures += 1
        except BlkfrontError:
            assert not stall and hostile is None, "only bad xenstore values may fail the connect"
            connect_failures += 1
        if dev is not None:
            assert not stall
            try:
                _check_io(dev, rng, seed, 16)
            except AssertionError:
                print("scenario:", offer, hostile, config)
                raise
            failure = dev.failed
            assert failure is None or failure[0] != "frontend.internal", failure
            dev.close()
        done = backend.wait_done(20)
        remove_vbd(xs0, be, fe)
        assert done["error"] in (None, "session timed out") or done["error"].startswith("connect"), done
        sessions += 1
        malformed += done["malformed"]
        for kind, n in done["kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
        if done["fatal_sent"]:
            fatal_sessions += 1
            assert dev is not None and dev.failed is not None, f"fatal {hostile} not detected"
    elapsed = time.monotonic() - started
    fatal_messages = sum(n for k, n in kinds.items() if k.startswith("fatal_"))
    without_storms = malformed - kinds.get("storm_event", 0)
    print(f"\nhostile: {sessions} sessions, {malformed} malformed messages ({without_storms} not storms, "
          f"{fatal_messages} fatal in {fatal_sessions} sessions), {connect_failures} refused connects, "
          f"{elapsed:.1f} s; {sorted(kinds.items())}")
    assert without_storms >= MIN_MALFORMED
    assert fatal_sessions > 50 and connect_failures > 5
    # Every kind of mischief was exercised.
    assert {f"fatal_{k}" for k in FATAL_KINDS} <= set(kinds)
    assert {"storm_event", "error_garbage", "eopnotsupp_garbage", "bad_xenstore"} <= set(kinds)
