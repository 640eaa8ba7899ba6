"""`xtransit run --config FILE`: the edge daemon (pipeline/run.py).

Exit status: 0 after a clean stop (SIGTERM, SIGINT), 1 for a runtime failure, 2 when the
configuration is invalid (every error printed), 3 when a configured interface does not exist,
4 when the kernel or the machine lacks a feature (the message points to `xtransit doctor`).
"""
from __future__ import annotations

import logging

import click

from ..config import ConfigError

EXIT_INVALID = 2


@click.command("run")
@click.option("--config", "-c", "config_file", required=True,
              type=click.Path(dir_okay=False, path_type=str), help="Configuration file (TOML).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="key=value lines, or one JSON object per line.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def run(config_file: str, log_format: str, log_level: str) -> None:
    """Run the edge: attach the XDP data plane to the configured interfaces, start the AF_XDP
    workers, the IKE responder and the state sync, and serve until SIGTERM or SIGINT.
    SIGHUP re-reads the configuration and applies it as map updates.

    Exit status: 0 stopped cleanly, 1 runtime failure, 2 invalid configuration, 3 interface
    missing, 4 kernel feature missing (see `xtransit doctor`)."""
    from .. import run as _run

    _run.setup_logging(log_format, getattr(logging, log_level.upper()))
    try:
        status = _run.run(config_file)
    except ConfigError as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        n = len(e.errors)
        click.echo(f"{config_file}: {n} error{'s' if n != 1 else ''}; nothing started "
                   f"(check with `xtransit config check {config_file}`)", err=True)
        raise SystemExit(EXIT_INVALID) from None
    except _run.RunError as e:
        click.echo(f"xtransit run: {e}", err=True)
        raise SystemExit(e.exit_status) from None
    except KeyboardInterrupt:
        status = 0
    except Exception as e:  # a message, not a traceback (--log-level debug: both)
        logging.getLogger("xtransit").debug("start failed", exc_info=True)
        click.echo(f"xtransit run: {type(e).__name__}: {e}", err=True)
        raise SystemExit(1) from None
    raise SystemExit(status)
