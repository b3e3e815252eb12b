"""README.md "Using it" runs as written: its first shell block, top to bottom, under `bash -e`
in a scratch directory, with only `xentools` put on PATH (as `. .venv/bin/activate` does) and
no software Xen running beforehand. The "Other commands" block names commands and options
that exist (checked against the click tree; they need a Xen host or the network to run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from xentools.tools.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def test_using_it_runs_as_written():
    script = _blocks("Using it")[0]
    assert "xentools vbd create" in script.split("xentools blkback serve")[0], "vbd create must come first"
    scratch = tempfile.mkdtemp(prefix="xtreadme")  # short: unix socket paths hold 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XENTOOLS_", "XENSTORED_"))}
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = scratch
    proc = subprocess.Popen(["bash", "-e", "-c", script + '\necho "README-DIR=$PWD"\n'], env=env, cwd=scratch,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the script left behind, on any outcome
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.communicate()
    assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{out}\n{err}"
    assert "Traceback" not in err
    assert "verified 2048 sectors from 0: all match" in out
    workdir = Path(re.search(r"README-DIR=(.*)", out).group(1))
    report = json.loads((workdir / "report.json").read_text())
    assert report["backend"] == "/local/domain/0/backend/vbd/1/51712"
    assert not (workdir / "sim" / "xenstored.sock").exists()  # the software Xen stopped
    shutil.rmtree(scratch, ignore_errors=True)


def _command(tokens: list[str]) -> tuple[click.Command, list[str]]:
    command: click.Command = cli
    rest = tokens[1:]
    while isinstance(command, click.Group) and rest and command.get_command(None, rest[0]) is not None:
        command = command.get_command(None, rest[0])
        rest = rest[1:]
    return command, rest


def test_other_commands_exist_with_their_options():
    for block in _blocks("Using it")[1:]:
        for line in block.splitlines():
            words = shlex.split(line.split("  #")[0])
            if not words or words[0] != "xentools":
                continue
            command, rest = _command(words)
            assert not isinstance(command, click.Group), f"{line!r}: no such command"
            known = {name for param in command.params for name in getattr(param, "opts", [])}
            for word in rest:
                option = word.strip("[]")
                if option.startswith("--"):
                    assert option in known, f"{line!r}: {command.name} has no option {option}"
