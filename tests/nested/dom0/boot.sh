#!/bin/bash
# DOM0 SIDE, stage 2: runs as PID 1 in dom0, in the host's own userland (overlay root).
#
# Owns: bringing up Xen's dom0 toolstack (xenfs, the xen-* driver modules, C xenstored,
# xen-init-dom0, xenconsoled), running the one command the host asked for, writing its
# verdict to the results share, and powering the machine off.
# Must not: decide what to test. The command comes from the host (tests/nested/run.py) as
# files in the results share, mounted at /run/nested by stage 1:
#   in:  command (a bash script: exports, then exec of the command), cwd (where to run it)
#   out: output (the command's stdout+stderr), exit-code, xen-version, xl-info, dom0.log,
#        dom0-dmesg.log (dom0's kernel log after the command)
# The command may leave more files for the host in $NESTED_RESULTS (this share).
# Every line this script prints starts with "nested-dom0:" so the host can time the stages.

R=/run/nested
export PATH=/usr/lib/xen-4.17/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
export XENTOOLS_NESTED=1 NESTED_RESULTS=$R

say() { echo "nested-dom0: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# The verdict is the exit code file; anything that stops us before the command ran writes
# 125 ("could not test") so the host never mistakes a broken boot for a test result.
finish() {
    echo "$1" > "$R/exit-code"
    sync
    say "verdict $1 at $(uptime_s) s; powering off"
    echo o > /proc/sysrq-trigger
    sleep 30
}
die() { say "FAIL: $*"; finish 125; }

say "stage 2 up at $(uptime_s) s: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 / 1024 " MiB"}' /proc/meminfo)"

exec 3>>"$R/dom0.log"
step() { echo "[$(uptime_s)] $*" >&3; }
mount -t xenfs xenfs /proc/xen 2>&3 || die "cannot mount xenfs on /proc/xen"
grep -q control_d /proc/xen/capabilities || die "not dom0: /proc/xen/capabilities lacks control_d"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>&3
mount -t tmpfs tmpfs /dev/shm 2>&3

# gntdev/gntalloc back libxengnttab/libxengntshr, evtchn backs libxenevtchn, privcmd is
# what xl and xen-init-dom0 hypercall through, blkback and loop serve the vbd tests.
step "loading modules"
for module in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback loop; do
    modprobe "$module" 2>&3 || die "modprobe $module failed (see dom0.log)"
done

step "starting xenstored"
# /run/lock: xl console takes its lock there (/var/lock/xenconsole.N).
mkdir -p /run/xenstored /run/lock /var/run/xen /var/log/xen/console /var/lib/xen /var/lib/xenstored
# Xen's C xenstored (not oxenstored): the reference our xenstore client is tested against.
XENSTORED_ROOTDIR=/run/xenstored xenstored --pid-file /run/xenstored.pid 2>&3 \
    || die "xenstored did not start"
# xenstored daemonizes before its socket answers; give it a minute (TCG on a busy host).
deadline=$(( $(date +%s) + 60 ))
until xenstore-read -s / >/dev/null 2>&1 || [ "$(date +%s)" -ge "$deadline" ]; do
    sleep 0.1
done
xenstore-read -s / >/dev/null 2>&1 || die "xenstored does not answer on its socket"
step "xen-init-dom0"
xen-init-dom0 >&3 2>&3 || die "xen-init-dom0 failed (see dom0.log)"
step "xenconsoled"
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file /run/xenconsoled.pid 2>&3 \
    || die "xenconsoled did not start"

step "xl info"
xl info > "$R/xl-info" 2>&3 || die "xl info failed: the toolstack is not up"
awk -F': ' '/^xen_version/ {print $2}' "$R/xl-info" > "$R/xen-version"
say "Xen $(cat "$R/xen-version") toolstack up at $(uptime_s) s"

[ -f "$R/command" ] || die "no command file in the results share"
cwd=$(cat "$R/cwd" 2>/dev/null || echo /)
cd "$cwd" || die "cannot cd to $cwd"
say "running in $cwd: $(tail -n 1 "$R/command")"
set -o pipefail
bash "$R/command" 2>&1 | tee "$R/output"
rc=$?
say "command exited $rc at $(uptime_s) s"
# The host counts user-space crashes in it (the lazy-FPU flake, tests/nested/README.md, is
# gone with eager-fpu; any crash left is worth a look).
dmesg > "$R/dom0-dmesg.log" 2>&1
finish "$rc"
