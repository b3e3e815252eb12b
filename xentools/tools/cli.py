"""The `xentools` command line.

Owns: the top-level click group, the error policy (one line on stderr, non-zero exit, no
traceback) and the list of subcommand modules. Must not: implement subcommands here; each
lives in its own module under xentools.tools and is listed in SUBCOMMANDS.

A subcommand's module is imported when that command is asked for (or for --help), so that
`python -m xentools blkback serve`, started once per boot by boot-test, loads the backend
and not the image tools or blkfront (~0.3 s on the host, ~18x that in a nested dom0).
"""

from __future__ import annotations

import importlib
import sys

import click

from xentools.core.errors import XentoolsError

# (module, attribute) of each click command or group, the attribute named as the command; a
# module that is not written yet is simply not listed.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("xentools.tools.sim_cmd", "sim"),
    ("xentools.tools.doctor", "doctor"),
    ("xentools.tools.vbd_cmd", "vbd"),
    ("xentools.tools.blkback_cmd", "blkback"),
    ("xentools.tools.blk_cmd", "blk"),
    ("xentools.tools.demo", "demo"),
    ("xentools.tools.bench", "bench"),
    ("xentools.tools.image_cmd", "image"),
]

EXIT_USAGE = 2
EXIT_ERROR = 1


class XentoolsGroup(click.Group):
    """Turns every expected failure into one line on stderr and a non-zero exit; imports a
    subcommand's module when the command is first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(attr for _, attr in SUBCOMMANDS)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            for module, attr in SUBCOMMANDS:
                if attr == cmd_name:
                    self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except XentoolsError as err:
            click.echo(f"xentools: error: {err}", err=True)
            ctx.exit(EXIT_ERROR)
        except OSError as err:
            click.echo(f"xentools: error: {err.strerror or err}"
                       + (f": {err.filename}" if err.filename else ""), err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("xentools: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=XentoolsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xentools")
def cli() -> None:
    """Xen paravirtual block tools: userspace blkfront/blkback, a software Xen, boot tests."""



def main() -> None:
    cli(prog_name="xentools")


if __name__ == "__main__":
    sys.exit(main())
