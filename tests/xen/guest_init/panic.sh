# GUEST SIDE scenario "panic", sourced by /init: a kernel panic on purpose.
#
# Owns: triggering the panic through the magic SysRq "c" (crash) key, which Linux reports as
# "Kernel panic - not syncing: sysrq triggered crash". Writing /proc/sysrq-trigger works
# whatever the kernel.sysrq mask is. A Xen PV guest's panic notifier then asks Xen for
# SHUTDOWN_crash, so the domain ends in the crashed state (xl.cfg on_crash decides the rest).
# Must not: return. If it does, the panic did not happen: that is reported as a failure.
# Prints: GUEST: panicking on purpose

say "panicking on purpose"
echo c > /proc/sysrq-trigger
nap 5
fail "still alive after echo c > /proc/sysrq-trigger"
