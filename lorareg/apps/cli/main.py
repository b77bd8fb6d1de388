"""The `lorareg` command group: one-line errors instead of tracebacks, text or --json output.

Each command group lives in a module of its own beside this one and registers on :data:`main`."""

from __future__ import annotations

import json
import os
import sys

import click

from ...core.version import __version__
from ...core.errors import LoraregError


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Every lorareg error becomes one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraregError as e:
            fail(str(e).splitlines()[0] if str(e) else e.__class__.__name__, e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except MemoryError:
            fail("out of memory", 1)
        except OSError as e:
            fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
        except Exception as e:  # noqa: BLE001 - a bug must still not print a traceback at users
            if os.environ.get("LORAREG_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            fail(f"unexpected {e.__class__.__name__}: {first} (set LORAREG_DEBUG=1 for a traceback; please report it)", 70)


def emit(as_json: bool, payload, text: str) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))
    else:
        click.echo(text)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorareg")
def main() -> None:
    """Detect, convert and port LoRA adapters between key formats and base models."""




def counts(values: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(values.items(), key=lambda kv: -kv[1]))
