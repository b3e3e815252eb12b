"""HVM boot reliability under nested emulation: boot the same HVM guest N times in a row in
dom0 and print how many passed (`make hvm-stress`, one nested run; not part of `make test`).

Owns: the loop and its summary. Each boot is `xentools image boot-test` of the image
tests/xen/hvm_images.py builds, with the nested HVM settings of hvm_images.hvm_options
(SeaBIOS, AHCI, our blkback by default). Nothing is retried: a triple fault is counted as
the `error` it is, with Xen's line quoted.
Must not: decide verdicts (boot-test does) or start Xen services.

Usage (in dom0, through the harness):
  tests/nested/run.py -- .venv/bin/python tests/xen/hvm_stress.py --boots 20 [--backend qdisk]
Exit code 0 when every boot passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guests import guest_kernel, unique_name  # noqa: E402
from hvm_images import boot_test, disk_digest_read, hvm_options, make_boot_image  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=20)
    parser.add_argument("--backend", choices=["xentools", "qdisk"], default="xentools")
    parser.add_argument("--emulated-disk", choices=["ide", "ahci"], default="ahci")
    args = parser.parse_args()
    results = Path(os.environ.get("NESTED_RESULTS") or tempfile.mkdtemp(prefix="hvm-stress-")) / "hvm-stress"
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hvm-stress-work-"))
    image = make_boot_image(work / "boot.raw", guest_kernel(), work)
    verdicts: collections.Counter[str] = collections.Counter()
    began = time.monotonic()
    for i in range(1, args.boots + 1):
        name = unique_name(f"xt-stress{i}")
        run = boot_test(f"boot {i}", image.path, results / name, name,
                        *hvm_options(args.backend, args.emulated_disk), "--first-output-timeout", "150",
                        "--timeout", "300")
        try:
            report = run.report()
            verdict = report["verdict"]
            if verdict == "pass" and disk_digest_read(run.console()) != image.sha256:
                verdict = "pass-but-wrong-data"
        except (OSError, ValueError, KeyError):
            report, verdict = {}, f"no-report(exit {run.returncode})"
        verdicts[verdict] += 1
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
        line = f"hvm-stress: {run.summary()}; dom0 load {load}"
        if verdict != "pass":
            line += f"; {report.get('reason')}: {report.get('matched_line')!r}"
        print(line, flush=True)
    passed = verdicts["pass"]
    print(f"hvm-stress: {passed}/{args.boots} passed ({json.dumps(dict(verdicts))}) in "
          f"{time.monotonic() - began:.0f} s, backend {args.backend}, emulated disk {args.emulated_disk}", flush=True)
    return 0 if passed == args.boots else 1


if __name__ == "__main__":
    sys.exit(main())
