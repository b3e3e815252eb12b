# xentools: every target sets itself up on a fresh Debian 12 machine.
# Python packages go into .venv; Debian packages are installed with apt-get when root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt-installed

# Debian packages the host-side tests need: the authoritative headers (struct layout checks),
# a 32-bit compiler for the x86_32 ABI probe, and Xen's C xenstore tools as a test peer;
# gcc and Python's headers build blkback's compiled ring loop (bindings/build_ringloop.py),
# and libc6-dev's static libc the guest bench's load generator (bench-xen-guest).
HOST_DEBS := libxen-dev gcc-multilib xenstore-utils gcc libc6-dev python3-dev
RINGLOOP := $(VENV)/.ringloop-built
# The guest bench's load generator (tests/xen/guest_load.c, static), for bench-xen-guest and
# the nested suite's short run of it.
GUEST_LOAD := build/guest-load

.PHONY: all venv debs ringloop test test-host test-host-pure demo bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)
	@$(MAKE) --no-print-directory $(RINGLOOP)

# blkback's compiled ring loop (xentools/devices/_blkback_ringloop*.so, cffi API mode). Without
# a compiler the package still works: blkback then serves rings with its pure-Python path.
# blkback_ringloop.py computes the sources' hash the module keeps (compiled() compares it).
$(RINGLOOP): xentools/devices/blkback_ringloop.c xentools/devices/blkback_ringloop.h xentools/devices/blkfront_ringloop.c xentools/devices/blkfront_ringloop.h bindings/build_ringloop.py xentools/devices/blkback_ringloop.py | $(STAMP)
	@if $(PY) bindings/build_ringloop.py; then touch $@; \
	else echo "make: blkback's compiled ring loop was not built: blkback serves rings with its pure-Python path"; fi

ringloop: $(RINGLOOP)

# Installs Debian packages when running as root; otherwise says what is missing.
$(APT_STAMP): | $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
	    missing=$$(for p in $(HOST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	    if [ -n "$$missing" ]; then \
	        echo "make: installing Debian packages: $$missing"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	    fi; \
	else \
	    for p in $(HOST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || { echo "make: Debian package $$p is missing; run as root or: apt-get install $$p"; exit 1; }; done; \
	fi
	touch $@

debs: $(APT_STAMP)

# pytest's exit code 5 (no tests collected) is a failure, not silence.
test-host: $(STAMP) $(APT_STAMP) $(RINGLOOP)
	@$(PY) -m pytest -q tests --ignore=tests/xen; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The pure-Python data path (no compiled ring loop): the same host suite with
# XENTOOLS_RINGLOOP=python, except the differential test (it runs both paths itself).
test-host-pure: $(STAMP) $(APT_STAMP) $(RINGLOOP)
	@XENTOOLS_RINGLOOP=python $(PY) -m pytest -q tests --ignore=tests/xen \
	    --ignore=tests/test_blkback_ringloop.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The nested QEMU runs on one core (tests/nested/run.py: -smp 1), so the host suite, on both
# data paths, runs beside it on the other; its output goes to build/test-host.log and is
# printed when both are done. Exit status: non-zero if either failed.
test: $(STAMP) $(APT_STAMP) $(RINGLOOP) $(GUEST_LOAD) debs-xen
	@mkdir -p build; \
	echo "make test: the host suite (compiled, then pure-Python data path) runs beside the nested suite; its log: build/test-host.log"; \
	( export PYTEST_ADDOPTS="-p no:cacheprovider"; $(MAKE) --no-print-directory test-host; a=$$?; \
	  $(MAKE) --no-print-directory test-host-pure; b=$$?; [ $$a -eq 0 ] && [ $$b -eq 0 ] ) >build/test-host.log 2>&1 & host=$$!; \
	rm -f build/nested-reruns.log; \
	NESTED_RERUN_LOG=$(CURDIR)/build/nested-reruns.log $(MAKE) --no-print-directory test-xen; xen=$$?; \
	wait $$host; hostrc=$$?; \
	echo "==== host suite (build/test-host.log) ===="; cat build/test-host.log; \
	cat build/nested-reruns.log 2>/dev/null; \
	echo "make test: host suite exit $$hostrc, nested suite exit $$xen, nested machine booted again $$(cat build/nested-reruns.log 2>/dev/null | wc -l) time(s) (a freeze: tests/nested/run.py)"; \
	[ $$hostrc -eq 0 ] && [ $$xen -eq 0 ]

demo: $(STAMP)
	$(VENV)/bin/xentools demo

bench: $(STAMP) $(RINGLOOP)
	$(VENV)/bin/xentools bench --json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis xentools/devices/_blkback_ringloop*.so

# ---- test-xen: the in-dom0 suite (tests/xen) on real Xen 4.17, nested in QEMU (TCG) ----
# tests/nested/run.py (host side) boots Xen + a Debian dom0 and runs the command after "--"
# in dom0 (tests/nested/dom0/: what runs there). Artefacts: build/nested/. Its exit code is
# the command's, 124 on timeout (env NESTED_TIMEOUT, seconds), 125 if dom0 could not test.
XEN_DEBS := xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils qemu-system-x86 \
            linux-image-amd64 busybox-static kmod libxengnttab1 libxenevtchn1 gcc \
            fio \
            qemu-system-xen seabios ovmf grub-xen-host \
            fdisk dosfstools mtools syslinux syslinux-common qemu-utils
# The second line: HVM/PVH/pvgrub2 boot tests (tests/xen/test_hvm_boot.py). qemu-system-xen is
# libxl's device model (/usr/libexec/xen-qemu-system-i386), seabios its BIOS, ovmf its UEFI,
# grub-xen-host pvgrub2; the rest build the guests' RAW/VHD images on the host without root.

.PHONY: debs-xen test-xen

# Checked on every run (dpkg -s is cheap), so a removed package is noticed. INITRD=No makes
# the kernel's postinst hook skip update-initramfs (dom0 boots our own initramfs), and
# --no-install-recommends keeps grub (and its update-grub hooks) out: the install cannot
# stall or fail in a bootloader step on a CI machine.
debs-xen:
	@missing=$$(for p in $(XEN_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	    echo "make: test-xen needs Debian packages:" $$missing "(run as root or apt-get install them)" >&2; exit 1; \
	fi; \
	echo "make: installing Debian packages for test-xen:" $$missing; \
	apt-get update -qq && \
	INITRD=No DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $$missing >/dev/null \
	    || { echo "make: apt-get install failed for:" $$missing >&2; exit 1; }

# pytest's exit code 5 (no tests collected) is a failure here too.
# Bytecode is compiled on the host first: dom0's Python runs ~18x slower, and with
# PYTHONDONTWRITEBYTECODE (set on these machines) it would compile every module each start.
test-xen: $(STAMP) debs-xen $(RINGLOOP) $(GUEST_LOAD)
	@$(PY) -m compileall -q -j 2 xentools tests >/dev/null
	@NESTED_TIMEOUT=$${NESTED_TIMEOUT:-2400} $(PY) tests/nested/run.py -- $(PY) -m pytest -q --durations=30 tests/xen; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests in dom0" >&2; exit 1; fi; exit $$rc

# ---- bench-xen: tests/xen/bench_blk.py in dom0 (one nested boot): Linux's xen-blkfront (fio)
# on Linux's xen-blkback, on QEMU's qdisk and on our blkback, and our blkfront on xen-blkback,
# 1 MiB sequential and 4 KiB QD32 random reads; prints one JSON line with the figures and ratios (also build/nested/run-*/results/
# bench-blk.json), after one line per target with its verdict (met, missed or undecided: the
# median's 96% interval against the target). Ratios are reported, not asserted. NESTED_SMP=2
# gives dom0 two vCPUs (the last then stands for the guest: the frontends' threads and interrupts
# there, the backends' on the other; bench_blk's Placement). BENCH_SECONDS: per measurement;
# BENCH_ROUNDS: interleaved rounds, ratios the median of the rounds' (single rounds under TCG
# range from 0.36 to 1.77 for the same code: 9 rounds of 3 s take about 6 minutes).
# BENCH_TIMEOUT: the nested boot's limit in seconds (run.py's --timeout; 9 rounds took 6.2 minutes).
BENCH_SECONDS ?= 3
BENCH_ROUNDS ?= 9
BENCH_TIMEOUT ?= 1800
.PHONY: bench-xen
bench-xen: $(STAMP) debs-xen $(RINGLOOP)
	@$(PY) -m compileall -q -j 2 xentools tests >/dev/null
	@$(PY) tests/nested/run.py --show-output --timeout $(BENCH_TIMEOUT) -- $(PY) tests/xen/bench_blk.py --seconds $(BENCH_SECONDS) --rounds $(BENCH_ROUNDS)

# ---- bench-xen-guest: tests/xen/bench_guest.py in dom0 (one nested boot, two CPUs under Xen):
# in a PV guest, its own xen-blkfront reads disks on Linux's xen-blkback, on our blkback and on
# QEMU's qdisk (build/guest-load, from tests/xen/guest_load.c, static: no fio in the guest), and
# our blkfront one on xen-blkback; 1 MiB sequential and 4 KiB QD32 random reads; dom0 pinned
# to CPU 0 and the guest to CPU 1; one JSON line (also build/nested/run-*/results/
# bench-guest.json) after one verdict line per target. BENCH_SECONDS and BENCH_ROUNDS as for
# bench-xen (9 rounds of 3 s took 5 minutes); GUEST_BENCH_SMP: the nested machine's CPUs (1:
# dom0 and the guest share one).
GUEST_BENCH_SMP ?= 2
$(GUEST_LOAD): tests/xen/guest_load.c | $(APT_STAMP)
	@mkdir -p build
	gcc -O2 -Wall -Wextra -static -o $@ tests/xen/guest_load.c
.PHONY: bench-xen-guest
bench-xen-guest: $(STAMP) debs-xen $(RINGLOOP) $(GUEST_LOAD)
	@$(PY) -m compileall -q -j 2 xentools tests >/dev/null
	@$(PY) tests/nested/run.py --smp $(GUEST_BENCH_SMP) --show-output --timeout $(BENCH_TIMEOUT) -- $(PY) tests/xen/bench_guest.py --seconds $(BENCH_SECONDS) --rounds $(BENCH_ROUNDS)

# ---- fault-matrix: tests/xen/test_fault_matrix.py with every fault kind and the default
# pairwise configuration matrix (one nested boot; `make test` runs a fixed subset of both).
.PHONY: fault-matrix
fault-matrix: $(STAMP) debs-xen
	@$(PY) -m compileall -q -j 2 xentools tests >/dev/null
	@NESTED_TIMEOUT=$${NESTED_TIMEOUT:-3000} $(PY) tests/nested/run.py -- \
	    env XENTOOLS_FAULT_MATRIX=full $(PY) -m pytest -q -s tests/xen/test_fault_matrix.py

# ---- hvm-stress: nested HVM reliability (not part of `make test`): one nested boot in which
# tests/xen/hvm_stress.py boots the HVM test guest (SeaBIOS, AHCI, our blkback) HVM_BOOTS times
# in a row and prints how many passed. ~1-2 min per boot on an idle 2-core host.
HVM_BOOTS ?= 20
.PHONY: hvm-stress
hvm-stress: $(STAMP) debs-xen
	@$(PY) -m compileall -q -j 2 xentools tests >/dev/null
	@NESTED_TIMEOUT=$${NESTED_TIMEOUT:-$$(( $(HVM_BOOTS) * 300 + 300 ))} $(PY) tests/nested/run.py -- \
	    $(PY) tests/xen/hvm_stress.py --boots $(HVM_BOOTS)
