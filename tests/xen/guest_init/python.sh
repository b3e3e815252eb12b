# GUEST SIDE scenario "python", sourced by /init: one Python program, run from the Python
# that tests/xen/domu.py copied into this initramfs (the repository's .venv interpreter, the
# modules the program imports, their shared libraries, at the paths dom0 has them).
#
# Owns: loading the Xen drivers the test asks for, optional breakage the test asks for (no
# xenbus device), and running the program.
# Must not: judge anything. The program prints its own "GUEST: " lines; this script prints
#   GUEST: python started at T s      (uptime when the interpreter is started)
#   GUEST: python exited RC           what the program returned
# Parameters (xentools.*): python (interpreter path), script (a Python file), cwd, load
# (modules joined by "+"; default xen-gntalloc+xen-evtchn; "none" for none), hide (xenbus:
# remove /dev/xen/xenbus first). The program reads any other xentools.* parameter from
# /proc/cmdline itself.

_load=${XT_load:-xen-gntalloc+xen-evtchn}
[ "$_load" = none ] && _load=
for _module in ${_load//+/ }; do load_module "$_module"; done

case "$XT_hide" in
    xenbus) rm -f /dev/xen/xenbus ;;
    '') ;;
    *) fail "unknown xentools.hide=$XT_hide" ;;
esac

[ -n "$XT_python" ] && [ -n "$XT_script" ] || fail "the python scenario needs xentools.python and xentools.script"
cd "${XT_cwd:-/}" || fail "no directory ${XT_cwd:-/}"
read -r _up _ < /proc/uptime
say "python started at $_up s"
# A process the emulator kills at its start (a signal before the program's first line, see
# /init's `run`) is run again, noted; once the program has begun (it creates $_begun), a
# signal is the program's own failure and ends the scenario: never run our code twice.
_begun=/tmp/.python-begun
_try=1
while :; do
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 \
        PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 XT_BEGUN=$_begun "$XT_python" "$XT_script" > /dev/console 2>&1
    _rc=$?
    [ "$_rc" -gt 128 ] || break
    dmesg | grep -E "segfault|general protection|traps:|gntalloc|xen" | tail -n 10 > /dev/console
    if [ -e "$_begun" ] || [ "$_try" -ge 3 ]; then break; fi
    say "note python killed by signal $((_rc - 128)), running it again"
    _try=$((_try + 1))
done
say "python exited $_rc"
