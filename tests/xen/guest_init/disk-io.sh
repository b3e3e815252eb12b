# GUEST SIDE scenario "disk-io", sourced by /init: block I/O through the guest kernel's
# xen-blkfront, checked by dom0.
#
# Owns: loading xen-blkfront, waiting for the disk, one O_DIRECT read of a region (its
# sha256 printed) and one O_DIRECT write of a known pattern at a region, read back.
# Must not: judge the data. dom0 knows what it put on the disk and what the pattern is
# (guests.write_pattern), and compares.
# Parameters (xentools.*): disk (default xvda), read=OFFSET+LENGTH, write=OFFSET+LENGTH,
# token (the pattern is "TOKEN\n" repeated, cut to LENGTH bytes, as `yes TOKEN | head -c`).
# OFFSET and LENGTH are bytes, multiples of 512 (O_DIRECT wants sector-aligned I/O); the
# block size is the largest of 64 KiB, 4 KiB and 512 that divides both.
# Prints:
#   GUEST: disk xvda SIZE bytes
#   GUEST: read-sha256 HEX            (sha256 of LENGTH bytes at OFFSET)
#   GUEST: wrote OK sha256 HEX        (written with O_DIRECT + fsync, read back identical)
# Every command that touches the disk or the data runs through /init's `run` (a process
# killed by a signal is run again: reads and whole-block writes are idempotent).

disk=${XT_disk:-xvda}
load_module xen-blkfront
wait_for_block "$disk"
read -r _sectors < "/sys/class/block/$disk/size"
say "disk $disk $((_sectors * 512)) bytes"

# region OFFSET+LENGTH: sets bs, skip (in blocks) and count.
region() {
    _off=${1%+*}
    _len=${1#*+}
    for bs in 65536 4096 512; do
        if [ $((_off % bs)) -eq 0 ] && [ $((_len % bs)) -eq 0 ]; then
            skip=$((_off / bs))
            count=$((_len / bs))
            return 0
        fi
    done
    fail "region $1 is not sector-aligned"
}

# direct_read FILE: the region's bytes into FILE, read with O_DIRECT (the page cache would
# hide whether the request reached the backend).
direct_read() {
    run dd if="/dev/$disk" of="$1" bs="$bs" skip="$skip" count="$count" iflag=direct status=none \
        2>/tmp/dd.err || fail "O_DIRECT read failed: $(cat /tmp/dd.err)"
}

# sha256 FILE: its sha256 into $sum.
sha256() {
    run sha256sum "$1" > /tmp/sum || fail "sha256sum $1 failed"
    read -r sum _ < /tmp/sum
}

if [ -n "$XT_read" ]; then
    region "$XT_read"
    direct_read /tmp/read
    sha256 /tmp/read
    say "read-sha256 $sum"
fi

if [ -n "$XT_write" ]; then
    [ -n "$XT_token" ] || fail "xentools.write needs xentools.token"
    region "$XT_write"
    # The pattern built by the shell itself: no process to lose.
    _len=$((bs * count))
    _pattern="$XT_token
"
    while [ "${#_pattern}" -lt "$_len" ]; do _pattern=$_pattern$_pattern; done
    printf '%s' "${_pattern:0:$_len}" > /tmp/pattern
    _pattern=
    sha256 /tmp/pattern
    want=$sum
    # conv=fsync: a flush request after the data, so the write is durable on the backend
    # before we report it.
    run dd if=/tmp/pattern of="/dev/$disk" bs="$bs" seek="$skip" count="$count" oflag=direct conv=fsync \
        status=none 2>/tmp/dd.err || fail "O_DIRECT write failed: $(cat /tmp/dd.err)"
    direct_read /tmp/back
    sha256 /tmp/back
    [ "$sum" = "$want" ] || fail "read back $sum after writing $want"
    say "wrote OK sha256 $want"
fi
