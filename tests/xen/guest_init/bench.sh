# GUEST SIDE scenario "bench", sourced by /init: the real-Xen bench's reads from a guest's own
# xen-blkfront (tests/xen/bench_guest.py), through /bin/guest-load (tests/xen/guest_load.c).
#
# Owns: loading xen-blkfront, waiting for the disks, then the rounds: in each, every disk's
# 1 MiB sequential reads, then every disk's 4 KiB random reads at the given depth, the disks
# in the given order, reversed every other round.
# Must not: judge the figures or the data. dom0 compares each disk's sum with its image and
# computes the ratios.
# Parameters (xentools.*): disks (names joined by "+", in order), rounds, seconds (per
# measurement), depth (of the random reads).
# Prints:
#   GUEST: sum DISK HEX                  FNV-1a 64 of the disk's first MiB (guest-load sum)
#   GUEST: load ROUND DISK seq MBPS      10^6 bytes per second
#   GUEST: load ROUND DISK rand IOPS
# A guest-load killed by a signal is run again by /init's `run` (said in a "note" line, which
# dom0 lists as a re-run); one that fails ends the scenario with FAIL and its message.

[ -n "$XT_disks" ] && [ -n "$XT_rounds" ] && [ -n "$XT_seconds" ] && [ -n "$XT_depth" ] ||
    fail "the bench scenario needs xentools.disks, rounds, seconds and depth"
load_module xen-blkfront
_disks=${XT_disks//+/ }
_reversed=
for _disk in $_disks; do
    wait_for_block "$_disk"
    _reversed="$_disk $_reversed"
    run /bin/guest-load sum "/dev/$_disk" > /tmp/load 2>/tmp/load.err || fail "$(cat /tmp/load.err)"
    read -r _ _sum < /tmp/load
    say "sum $_disk $_sum"
done

_round=0
while [ "$_round" -lt "$XT_rounds" ]; do
    _order=$_disks
    [ $((_round % 2)) -eq 1 ] && _order=$_reversed
    for _kind in seq rand; do
        for _disk in $_order; do
            run /bin/guest-load "$_kind" "/dev/$_disk" "$XT_seconds" "$XT_depth" > /tmp/load 2>/tmp/load.err ||
                fail "$(cat /tmp/load.err)"
            read -r _ _value < /tmp/load
            say "load $_round $_disk $_kind $_value"
        done
    done
    _round=$((_round + 1))
done
