"""`xtransit` command line: one group per area, the way network engineers expect to find them.

Subcommand implementations live in their own modules (``pipeline/commands/*.py``) and are
imported lazily so that `xtransit --help` stays fast and a missing optional piece (bcc, the
native module) only affects the commands that need it.
"""
from __future__ import annotations

import importlib
import importlib.util

import click

from . import __version__

# name -> (module, attribute, short help); each attribute is a click command or group.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("pipeline.commands.run", "run", "Run the edge: data plane, IKE, state sync, analytics."),
    "doctor": ("pipeline.commands.doctor", "doctor", "Check this machine can run xtransit."),
    "config": ("pipeline.commands.config", "config", "Validate and inspect configuration files."),
    "tunnel": ("pipeline.commands.tunnel", "tunnel", "Inspect configured tunnels."),
    "sa": ("pipeline.commands.sa", "sa", "Inspect IKE and Child SAs."),
    "stats": ("pipeline.commands.stats", "stats", "Per-tunnel counters and rates."),
    "analytics": ("pipeline.commands.analytics", "analytics", "Traffic history and top talkers."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, (mod, _, _) in _COMMANDS.items() if importlib.util.find_spec(mod)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = _COMMANDS.get(name)
        if entry is None or importlib.util.find_spec(entry[0]) is None:
            return None
        return getattr(importlib.import_module(entry[0]), entry[1])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, _COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xtransit")
def cli() -> None:
    """xtransit: anycast GRE and IPsec tunnel edge."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
