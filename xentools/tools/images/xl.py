"""One guest's life under xl, for every caller: the boot test (tools/images/boottest.py) and
the nested tests in dom0 (tests/xen/guests.py).

Owns: the xl.cfg of a guest from a structured description (`GuestConfig`, `render_xl_cfg`,
`parse_cfg_line` for extra KEY=VALUE lines); how xl is run (`Runner`: `SubprocessRunner` for
real, a fake `xl` in host tests) and asked again when a signal killed it (`run_xl`, on
tenacity: never `create`, and each repeat told to the caller's `on_rerun`); the domain's life
(`XlDomain`: `xl create -p`, its domid, unpause, alive by name, its state flags by domid
confirmed with the whole `xl list`, waiting until it ended or is gone, destroy); the list of
domains (`domains`); the guest's console as a stream (`LogConsole`: xenconsoled's
guest-<name>.log, named by `console_log_path`; `PtyConsole`: `xl console` on a pty).
Must not: decide a verdict, serve a disk, or start Xen services (xenconsoled's --log-dir is
the caller's to know).

Facts (/work/shared/docs/xen-in-qemu.md): create paused, attach the console, then unpause, and
no early output is lost; under nested emulation dom0 processes (xl among them) were seen to die
of SIGSEGV now and then, and such a crash is no answer about the guest.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import tenacity

from xentools.tools.images.errors import BootTestError

__all__ = [
    "Completed", "Console", "GuestConfig", "LogConsole", "PtyConsole", "Runner", "SubprocessRunner", "XlDomain",
    "check_xl", "console_log_path", "domains", "parse_cfg_line", "render_xl_cfg", "run_xl",
]

XL_TIMEOUT = 120.0
# Seconds between two looks at a domain that is expected to change state.
POLL = 0.2
# xl.cfg strings are quoted; these characters would need escapes libxlu may not read back.
_CFG_BAD = re.compile(r"['\"\\\n\r\x00-\x1f]")
# xl.cfg(5): what the toolstack does when the guest powers off, reboots or crashes.
ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy", "coredump-restart",
           "soft-reset")
_XL_STATE = re.compile(r"^[-rbpscd]{6}$")


# ------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class GuestConfig:
    """What goes into a guest's xl.cfg."""

    name: str
    guest_type: str  # hvm, pv, pvh
    memory_mb: int
    vcpus: int
    kernel: str | None = None
    ramdisk: str | None = None
    extra: str | None = None
    disks: tuple[str, ...] = ()
    # HVM only: bios= (seabios, ovmf; None: xl's default), hdtype= for the toolstack's own
    # emulated disks (ide, ahci), and QEMU arguments (device_model_args_hvm=).
    firmware: str | None = None
    emulated_disk: str | None = None
    device_model_args: tuple[str, ...] = ()
    # Extra xl.cfg lines, "KEY=VALUE" as xl.cfg(5) spells them (--xl-cfg), written last.
    extra_cfg: tuple[str, ...] = ()
    # The kernel= is a bootloader (pvgrub2): its output is the bootloader milestone.
    kernel_is_bootloader: bool = False
    # on_poweroff, on_reboot, on_crash. "destroy": a test never reboots into a loop; "preserve"
    # keeps a guest that ended until it is destroyed, so that xenconsoled can still read the
    # end of its console ring and its final state can be read.
    on_poweroff: str = "destroy"
    on_reboot: str = "destroy"
    on_crash: str = "destroy"


def _q(key: str, value: str) -> str:
    if _CFG_BAD.search(value):
        raise BootTestError("xlcfg.value", f"{key} {value!r} contains a quote, backslash or control character")
    return f"'{value}'"


def render_xl_cfg(cfg: GuestConfig) -> str:
    """The xl.cfg text (every value checked: a value xl would misread is refused here)."""
    if cfg.guest_type not in ("hvm", "pv", "pvh"):
        raise BootTestError("xlcfg.type", f"guest type {cfg.guest_type!r} is not hvm, pv or pvh")
    if cfg.guest_type != "hvm" and not cfg.kernel:
        raise BootTestError("xlcfg.kernel", f"a {cfg.guest_type} guest needs --kernel (this tool does not run pygrub)")
    lines = [
        "# Written by xentools (xentools.tools.images.xl).",
        f"name = {_q('name', cfg.name)}",
        f"type = '{cfg.guest_type}'",
        f"memory = {int(cfg.memory_mb)}",
        f"vcpus = {int(cfg.vcpus)}",
    ]
    if cfg.kernel:
        lines.append(f"kernel = {_q('kernel', cfg.kernel)}")
    if cfg.ramdisk:
        lines.append(f"ramdisk = {_q('ramdisk', cfg.ramdisk)}")
    if cfg.extra:
        lines.append(f"extra = {_q('extra', cfg.extra)}")
    if cfg.guest_type == "hvm":
        # The emulated UART goes to a pty that `xl console -t serial` reads; no display.
        lines += ["serial = 'pty'", "vnc = 0", "sdl = 0", "boot = 'c'"]
        if cfg.firmware:
            if cfg.firmware not in FIRMWARES:
                raise BootTestError("xlcfg.firmware", f"firmware {cfg.firmware!r} is not one of {', '.join(FIRMWARES)}")
            lines.append(f"bios = '{cfg.firmware}'")
        if cfg.emulated_disk:
            if cfg.emulated_disk not in EMULATED_DISKS:
                raise BootTestError("xlcfg.hdtype", f"emulated disk {cfg.emulated_disk!r} is not ide or ahci")
            lines.append(f"hdtype = '{cfg.emulated_disk}'")
        if cfg.device_model_args:
            args = ", ".join(_q("device_model_args_hvm", a) for a in cfg.device_model_args)
            lines.append(f"device_model_args_hvm = [ {args} ]")
    elif cfg.firmware or cfg.emulated_disk or cfg.device_model_args:
        raise BootTestError("xlcfg.hvm_only", f"firmware and emulated disks are for HVM guests, not {cfg.guest_type}")
    disks = ", ".join(_q("disk", d) for d in cfg.disks)
    lines.append(f"disk = [ {disks} ]")
    for key in ("on_poweroff", "on_reboot", "on_crash"):
        action = getattr(cfg, key)
        if action not in ACTIONS:
            raise BootTestError("xlcfg.action", f"{key} {action!r} is not one of {', '.join(ACTIONS)}")
        lines.append(f"{key} = '{action}'")
    lines += [parse_cfg_line(line) for line in cfg.extra_cfg]
    return "\n".join(lines) + "\n"


FIRMWARES = ("seabios", "ovmf")
EMULATED_DISKS = ("ide", "ahci")
_CFG_KEY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\S.*?)\s*$")
# Keys written from the description itself: another value would break the test, not the guest.
_CFG_OWN = frozenset({"name", "type", "builder", "disk", "serial", "on_poweroff", "on_reboot", "on_crash"})


def parse_cfg_line(text: str) -> str:
    """An --xl-cfg 'KEY=VALUE' line, checked: one line, a key, a value; the keys the test
    depends on are refused (the message names the option to use instead). The value is
    passed as written (xl.cfg(5) syntax: 'string', number, [ list ])."""
    m = _CFG_KEY.match(text)
    if m is None or "\n" in text or "\r" in text:
        raise BootTestError("xlcfg.extra", f"--xl-cfg {text!r} is not KEY=VALUE on one line, e.g. tsc_mode='native'")
    key, value = m.groups()
    if key in _CFG_OWN:
        raise BootTestError("xlcfg.extra", f"--xl-cfg {key}= is written by boot-test itself (use --name, --type, "
                                           "--backend, --vdev instead)")
    return f"{key} = {value}"


# ------------------------------------------------------------------------------ runners

@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


class Console(abc.ABC):
    """A guest console being read."""

    mode: str

    @abc.abstractmethod
    def read(self, timeout: float) -> bytes | None:
        """Bytes that arrived within `timeout` s (b"" for none), None once the console ended."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def ended_why(self) -> str:
        """Why read() returned None, for messages."""
        return "the console ended"


class Runner(abc.ABC):
    """How xl is run. SubprocessRunner runs it for real (tests put a fake `xl` first on PATH);
    a caller may pass its own, e.g. to run xl inside another environment."""

    @abc.abstractmethod
    def run(self, argv: Sequence[str], timeout: float) -> Completed: ...

    @abc.abstractmethod
    def spawn_console(self, argv: Sequence[str]) -> Console: ...


class PtyConsole(Console):
    """`xl console` on a pseudo-terminal: xenconsole wants a terminal for its stdin."""

    mode = "xl"

    def __init__(self, proc: subprocess.Popen[bytes], master: int) -> None:
        self.proc = proc
        self._master: int | None = master

    def read(self, timeout: float) -> bytes | None:
        if self._master is None:
            return None
        ready, _, _ = select.select([self._master], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the other side of the pty is closed
            return None
        return data or None

    def ended_why(self) -> str:
        code = self.proc.poll()
        return "xl console is still running" if code is None else f"xl console exited {code}"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._master is not None:
            os.close(self._master)
            self._master = None


class LogConsole(Console):
    """xenconsoled's log of the guest (`xenconsoled --log=guest --log-dir=DIR`), followed from
    `offset` on (xenconsoled appends to an existing log). It never ends by itself: the caller
    asks xl whether the domain is still there."""

    mode = "log"

    def __init__(self, path: Path, offset: int, sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self.offset = offset
        self._sleep = sleep
        self._f: IO[bytes] | None = None

    def read(self, timeout: float) -> bytes | None:
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                self._sleep(min(timeout, 0.05))
                return b""
            self._f.seek(self.offset)
        data = self._f.read(65536)
        if not data:
            self._sleep(min(timeout, 0.05))
        return data

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class SubprocessRunner(Runner):
    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        try:
            p = subprocess.run(list(argv), capture_output=True, text=True, errors="replace",
                               timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError:
            raise BootTestError("boottest.no_xl", f"{argv[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise BootTestError("boottest.xl_timeout", f"{' '.join(argv[:3])} did not finish in {timeout:g} s") from None
        return Completed(p.returncode, p.stdout, p.stderr)

    def spawn_console(self, argv: Sequence[str]) -> Console:
        master, slave = os.openpty()
        try:
            proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                    start_new_session=True)
        except OSError as err:
            os.close(master)
            raise BootTestError("boottest.console", f"cannot start {argv[0]}: {err.strerror}") from None
        finally:
            os.close(slave)
        return PtyConsole(proc, master)


def console_log_path(log_dir: str | os.PathLike[str], name: str) -> Path:
    """Where `xenconsoled --log=guest --log-dir=LOG_DIR` writes the console of guest `name`."""
    return Path(log_dir) / f"guest-{name}.log"


# ------------------------------------------------------------------------------- xl runs

def run_xl(args: Sequence[str], *, xl: str = "xl", runner: Runner | None = None, timeout: float = XL_TIMEOUT,
           on_rerun: Callable[[str], None] | None = None) -> Completed:
    """`xl ARGS`, its exit code and output as they are. An xl killed by a signal (a negative
    return code: it crashed) gave no answer at all: every command but `create` (which may have
    made the domain) is asked again, once, and `on_rerun` is told why."""

    def told(state: tenacity.RetryCallState) -> None:
        done = state.outcome.result() if state.outcome else None
        if on_rerun is not None and done is not None:
            on_rerun(f"`xl {' '.join(args)}` was killed by signal {-done.returncode}; asked again")

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(1 if args[0] == "create" else 2),
        retry=tenacity.retry_if_result(lambda done: done.returncode < 0),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        before_sleep=told,
    )
    return retrying((runner or SubprocessRunner()).run, [xl, *args], timeout)


def _failed(args: Sequence[str], done: Completed) -> BootTestError:
    last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
    return BootTestError("boottest.xl_failed", f"xl {args[0]} failed (exit {done.returncode}): {last}")


def check_xl(args: Sequence[str], **how: object) -> Completed:
    """run_xl (same keywords), and BootTestError (rule boottest.xl_failed, xl's last line)
    unless xl exited 0."""
    done = run_xl(args, **how)  # type: ignore[arg-type]
    if done.returncode != 0:
        raise _failed(args, done)
    return done


def _rows(listing: str) -> list[tuple[str, int, str]]:
    """(name, domid, state flags or "") of each domain row of `xl list`."""
    rows = []
    for line in listing.splitlines()[1:]:
        words = line.split()
        if len(words) >= 2 and words[1].isdigit():
            flags = words[4] if len(words) >= 5 and _XL_STATE.match(words[4]) else ""
            rows.append((words[0], int(words[1]), flags))
    return rows


def domains(**how: object) -> list[tuple[str, int]]:
    """(name, domid) of every domain `xl list` shows, Domain-0 included (`how`: run_xl's
    keywords)."""
    return [(name, domid) for name, domid, _ in _rows(check_xl(["list"], **how).stdout)]


class XlDomain:
    """One domain's life under xl. Commands name it by its name, as xl's users do (a domain
    is created by name; a name outlives nothing but its domain); its state is read by domid,
    which a dying domain keeps while its name is gone.

        domain = XlDomain(cfg.name)
        domain.create(cfg_path)          # paused; domain.domid is known
        ...                              # attach the console, write vbds
        domain.unpause()
        domain.wait_ended(timeout)       # or watch the console
        domain.destroy()                 # always, whatever happened before

    `on_rerun` is told every xl command asked again after a crash (see run_xl) and every
    `xl list ID` that failed though the whole list still shows the domain."""

    def __init__(self, name: str, *, xl: str = "xl", runner: Runner | None = None, timeout: float = XL_TIMEOUT,
                 on_rerun: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.name = name
        self.xl = xl
        self.runner = runner or SubprocessRunner()
        self.timeout = timeout
        self.on_rerun = on_rerun
        self._sleep = sleep
        self.domid: int | None = None
        self.created = False  # `xl create` succeeded
        self.create_output = ""  # what it printed (libxl's warnings)
        self.create_failure = ""  # all it printed when it failed: libxl's reason is rarely its last line

    def run(self, *args: str, timeout: float | None = None) -> Completed:
        return run_xl(args, xl=self.xl, runner=self.runner, on_rerun=self.on_rerun,
                      timeout=self.timeout if timeout is None else timeout)

    def check(self, *args: str, timeout: float | None = None) -> Completed:
        done = self.run(*args, timeout=timeout)
        if done.returncode != 0:
            raise _failed(args, done)
        return done

    def create(self, cfg_path: str | os.PathLike[str]) -> int:
        """`xl create -p CFG`: the domain exists, paused, with its console; returns its domid.
        After a failure a domain of that name may exist all the same: destroy() finds it."""
        done = self.run("create", "-p", str(cfg_path))
        if done.returncode != 0:
            self.create_failure = (done.stdout + done.stderr).strip()[-4000:]
            raise _failed(("create",), done)
        self.created = True
        self.create_output = (done.stdout + done.stderr).strip()[-2000:]
        self.domid = self.lookup()
        return self.domid

    def lookup(self) -> int:
        """The domid of the domain named so (`xl domid NAME`)."""
        out = self.check("domid", self.name).stdout.strip()
        if not out.isdigit():
            raise BootTestError("boottest.xl_failed", f"xl domid printed {out[:40]!r}, not a domain id")
        return int(out)

    def unpause(self) -> None:
        self.check("unpause", self.name)

    def alive(self, confirm: bool = False) -> bool:
        """False when xl says that no domain has the name (with `confirm`: twice in a row, for
        a watcher that would judge a guest wrongly taken for gone on half its output)."""
        for attempt in range(2 if confirm else 1):
            if attempt:
                self._sleep(POLL)
            if self.run("domid", self.name).returncode <= 0:
                return True  # 0: there; < 0: xl crashed twice, which proves nothing
        return False

    def _once(self, *args: str) -> Completed:
        return self.runner.run([self.xl, *args], self.timeout)

    def state(self) -> str | None:
        """xl's six state flags (r b p s c d, "-" where unset), or None when the domain is gone."""
        if self.domid is None:
            raise BootTestError("boottest.xl_failed", f"domain {self.name} was not created")
        domid = self.domid
        result = self._once("list", str(domid))
        if result.returncode != 0:
            # `xl list ID` also fails when xl itself dies (the emulator's SIGSEGV in a new
            # process; xl once read garbage from xl.conf over 9p): a domain is "gone" only when
            # the domain list, read whole, lacks it. Each such repeat is told to on_rerun.
            for attempt in range(1, 4):
                listed = self._once("list")
                if listed.returncode == 0 and "Domain-0" in listed.stdout:
                    for _, listed_id, flags in _rows(listed.stdout):
                        if listed_id == domid and flags:
                            if self.on_rerun is not None:
                                self.on_rerun(f"`xl list {domid}` exited {result.returncode} "
                                              f"({(result.stderr or '').strip()[:160]!r}) though `xl list` shows "
                                              "the domain")
                            return flags
                    return None
                self._sleep(attempt)
            raise BootTestError("boottest.xl_failed", f"xl list {domid} and xl list failed 4 times: "
                                                      f"{(result.stderr or '').strip()}")
        for _, listed_id, flags in _rows(result.stdout):
            if listed_id == domid and flags:
                return flags
        raise BootTestError("boottest.xl_failed", f"cannot read the state of domain {domid} from: {result.stdout!r}")

    def ended(self) -> str | None:
        """"shutdown", "crashed" or "gone" once the guest stopped running, else None."""
        flags = self.state()
        if flags is None:
            return "gone"
        if "c" in flags:
            return "crashed"
        if "s" in flags or "d" in flags:
            return "shutdown"
        return None

    def wait_ended(self, timeout: float, poll: float = 0.5) -> str | None:
        """ended() once it says so, or None when `timeout` s passed first."""
        deadline = time.monotonic() + timeout
        while (end := self.ended()) is None:
            if time.monotonic() > deadline:
                return None
            self._sleep(poll)
        return end

    def wait_gone(self, timeout: float, poll: float = POLL) -> bool:
        """True once xl no longer lists the domain (Xen frees a destroyed domain only when no
        backend maps its pages any more), False when `timeout` s passed first."""
        deadline = time.monotonic() + timeout
        while self.state() is not None:
            if time.monotonic() > deadline:
                return False
            self._sleep(poll)
        return True

    def destroy(self) -> str | None:
        """`xl destroy NAME`; None once no domain has the name (destroyed now, or gone
        before, as after a failed create), else xl's last line of why not."""
        done = self.run("destroy", self.name)
        if done.returncode == 0 or not self.alive():
            return None
        return (done.stderr.strip().splitlines() or ["no output"])[-1]
