"""The `xentools` command line.

Owns: the top-level click group, the error policy (one line on stderr, non-zero exit, no
traceback) and the list of subcommand modules. Must not: implement subcommands here; each
lives in its own module under xentools.tools and is listed in SUBCOMMANDS.
"""

from __future__ import annotations

import importlib
import sys

import click

from xentools.core.errors import XentoolsError

# (module, attribute) of each click command or group; a module that is not written yet is
# simply not listed.
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
    """Turns every expected failure into one line on stderr and a non-zero exit."""

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


for _module, _attr in SUBCOMMANDS:
    cli.add_command(getattr(importlib.import_module(_module), _attr))


def main() -> None:
    cli(prog_name="xentools")


if __name__ == "__main__":
    sys.exit(main())
