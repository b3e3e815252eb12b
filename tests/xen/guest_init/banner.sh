# GUEST SIDE scenario "banner", sourced by /init: what a small real image does at boot, read
# its disk's partition table and file system, then print a login prompt.
#
# Owns: loading xen-blkfront and the ext2 driver (ext4.ko, CONFIG_EXT4_USE_FOR_EXT2), waiting
# for the disk and its first partition, two reads of the disk at once, mounting it read-only,
# printing one file's sha256 and text, unmounting, and setting the banner
# "xentools-guest login: " that /init prints last, on a line of its own (what a boot test's
# success pattern "login:" matches). After
# the banner the guest waits like a getty (xentools.then=wait, the default here) unless
# told xentools.then=poweroff.
# Must not: write to the disk (mounted ro: the image must read back unchanged).
# Parameters (xentools.*): disk (default xvda), part (default 1), file (default motd).
# Prints:
#   GUEST: mounted /dev/xvda1 ext2
#   GUEST: file motd sha256 HEX
#   GUEST: text <each line of the file>
#   GUEST: done banner at T s
#   xentools-guest login:

disk=${XT_disk:-xvda}
part=$disk${XT_part:-1}
file=${XT_file:-motd}
XT_then=${XT_then:-wait}
load_module xen-blkfront
load_module ext4
wait_for_block "$disk"
wait_for_block "$part"
# Two readers at once, as a booting system's probes are: two requests in flight on the ring
# (the fault matrix's duplicate pairs one answer with another of the same push). Reads only,
# O_DIRECT (one request each, never served from the page cache).
run dd if="/dev/$disk" of=/dev/null bs=4k count=1 skip=64 iflag=direct 2>/dev/null &
run dd if="/dev/$disk" of=/dev/null bs=4k count=1 skip=128 iflag=direct 2>/dev/null &
wait
run mount -t ext2 -o ro "/dev/$part" /mnt 2>/tmp/mount.err \
    || fail "mount /dev/$part: $(cat /tmp/mount.err)"
say "mounted /dev/$part ext2"
[ -f "/mnt/$file" ] || fail "no file $file on /dev/$part"
run sha256sum "/mnt/$file" > /tmp/sum || fail "sha256sum /mnt/$file failed"
read -r sum _ < /tmp/sum
say "file $file sha256 $sum"
while IFS= read -r line; do
    say "text $line"
done < "/mnt/$file"
run umount /mnt || fail "umount /dev/$part"
prompt='xentools-guest login: '
