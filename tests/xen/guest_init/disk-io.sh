# GUEST SIDE scenario "disk-io", sourced by /init: block I/O through the guest kernel's
# xen-blkfront, checked by dom0.
#
# Owns: loading xen-blkfront, waiting for the disk, one O_DIRECT read of a region (its
# sha256 printed) and one O_DIRECT write of a known pattern at a region, read back.
# Must not: judge the data. dom0 knows what it put on the disk and what the pattern is
# (guests.write_pattern), and compares.
# Parameters (xentools.*): disk (default xvda), read=OFFSET+LENGTH, write=OFFSET+LENGTH,
# token (the pattern is "TOKEN\n" repeated, cut to LENGTH bytes: `yes TOKEN | head -c`).
# OFFSET and LENGTH are bytes, multiples of 512 (O_DIRECT wants sector-aligned I/O).
# Prints:
#   GUEST: disk xvda SIZE bytes
#   GUEST: read-sha256 HEX            (sha256 of LENGTH bytes at OFFSET)
#   GUEST: wrote OK sha256 HEX        (written with O_DIRECT + fsync, read back identical)

disk=${XT_disk:-xvda}
load_module xen-blkfront
wait_for_block "$disk"
say "disk $disk $(( $(cat "/sys/class/block/$disk/size") * 512 )) bytes"

# region OFFSET+LENGTH -> "BS SKIP COUNT": the largest of 64 KiB, 4 KiB, 512 dividing both.
region() {
    off=${1%+*}
    len=${1#*+}
    for bs in 65536 4096 512; do
        if [ $((off % bs)) -eq 0 ] && [ $((len % bs)) -eq 0 ]; then
            echo "$bs $((off / bs)) $((len / bs))"
            return 0
        fi
    done
    fail "region $1 is not sector-aligned"
}

# direct_read BS SKIP COUNT: the bytes, read with O_DIRECT (the page cache would hide
# whether the request reached the backend).
direct_read() {
    dd if="/dev/$disk" bs="$1" skip="$2" count="$3" iflag=direct 2>/tmp/dd.err \
        || fail "O_DIRECT read failed: $(cat /tmp/dd.err)"
}

if [ -n "$XT_read" ]; then
    set -- $(region "$XT_read")
    sum=$(direct_read "$1" "$2" "$3" | sha256sum) || fail "read of $XT_read failed"
    say "read-sha256 ${sum%% *}"
fi

if [ -n "$XT_write" ]; then
    [ -n "$XT_token" ] || fail "xentools.write needs xentools.token"
    set -- $(region "$XT_write")
    yes "$XT_token" | head -c $(( $3 * $1 )) > /tmp/pattern
    want=$(sha256sum < /tmp/pattern)
    # conv=fsync: a flush request after the data, so the write is durable on the backend
    # before we report it.
    dd if=/tmp/pattern of="/dev/$disk" bs="$1" seek="$2" count="$3" oflag=direct conv=fsync \
        2>/tmp/dd.err || fail "O_DIRECT write failed: $(cat /tmp/dd.err)"
    got=$(direct_read "$1" "$2" "$3" | sha256sum)
    [ "$got" = "$want" ] || fail "read back ${got%% *} after writing ${want%% *}"
    say "wrote OK sha256 ${want%% *}"
fi
