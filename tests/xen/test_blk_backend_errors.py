"""Our blkback, on real Xen, when it cannot serve: the failure reaches the frontend.

Owns: proof, on real xenstored (not the software Xen), that a vbd whose image cannot be
opened gets Linux's xenbus_dev_fatal treatment from our blkback (the "<errno> <message>"
error node under the backend domain's error/ tree and under the backend, state Closing, a
one-line exit 1), and that our blkfront in dom0 fails at once with that reason.
"""

from __future__ import annotations

import time

import pytest
from blk_helpers import (
    DOM0,
    CheckedPlatform,
    OurBlkback,
    no_vbd_left,  # noqa: F401 - fixture
    our_vbd,
    read_key,
    self_frontend_dir,
    xs_fixture,  # noqa: F401 - fixture "xs"
)

from xentools.devices.blkfront import BlkFront, BlkfrontConfig
from xentools.devices.blkfront_types import BlkfrontError
from xentools.devices.toolstack import destroy_vbd

DEVID = 51776  # xvde


@pytest.mark.usefixtures("no_vbd_left")
def test_a_backend_that_cannot_serve_tells_our_frontend_why_at_once(tmp_path, xs):
    """On real xenstored: an image that is not there makes our blkback write the error node
    (where Linux's xenbus_dev_fatal writes it, and under the backend) and Closing, and exit 1
    with one line; our blkfront fails at once with that reason, not after its timeout."""
    missing = tmp_path / "absent.raw"
    paths = our_vbd(xs, missing, frontend_domid=DOM0, devid=DEVID, frontend_dir=self_frontend_dir(DEVID))
    try:
        with OurBlkback(paths.backend, missing, tmp_path) as backend:
            assert backend.wait_exit() == 1
            lines = backend.stderr().strip().splitlines()
            assert len(lines) == 1 and "image.missing" in lines[0], lines
            assert read_key(xs, f"{paths.backend}/state") == "5"
            error = read_key(xs, f"{paths.backend}/error")
            assert error is not None and error.startswith("2 image.missing"), error
            linux_node = f"/local/domain/{DOM0}/error/" + paths.backend.split("/", 4)[4] + "/error"
            assert read_key(xs, linux_node) == error
            started = time.monotonic()
            platform = CheckedPlatform()
            try:
                with pytest.raises(BlkfrontError) as err:
                    BlkFront.attach(platform, paths.frontend, config=BlkfrontConfig(connect_timeout=60))
            finally:
                platform.close()
            assert time.monotonic() - started < 20, "our blkfront waited for its timeout"
            assert "the backend says: image.missing" in str(err.value), err.value
            print(f"our blkfront, on a backend that cannot open its image: {err.value}")
    finally:
        destroy_vbd(xs, paths)
        if read_key(xs, f"/local/domain/{DOM0}/error/{paths.backend.split('/', 4)[4]}") is not None:
            xs.rm(f"/local/domain/{DOM0}/error/{paths.backend.split('/', 4)[4]}")
