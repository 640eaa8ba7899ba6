"""`xtransit doctor`: run the machine checks of pipeline/doctor.py and print one line per check,
with the fix under every FAIL and WARN. Exit status 0 only when no required check failed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from .. import doctor as d


def render(results: list[d.Result]) -> list[str]:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        lines.append(f"{r.status.value}  {r.name:<{width}}  {r.detail}")
        if r.status is not d.Status.PASS and r.fix:
            lines.append(f"{'':4}  {'':<{width}}  fix: {r.fix}")
    count = {s: sum(r.status is s for r in results) for s in d.Status}
    n = len(results)
    total = (f"{n} check{'' if n == 1 else 's'}: {count[d.Status.PASS]} passed, "
             f"{count[d.Status.FAIL]} failed, {count[d.Status.WARN]} warnings")
    lines += ["", total]
    return lines


@click.command("doctor")
@click.option("--check", "names", multiple=True, type=click.Choice(list(d.CHECKS)),
              help="Run only this check (repeatable). Default: all of them.")
@click.option("--modules-dir", type=click.Path(file_okay=False, path_type=Path),
              default=d.SYSTEM_MODULES_DIR, show_default=True,
              help="Where to look for <kernel release>/build (kernel headers for bcc).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the results as JSON (name, status, detail, fix) instead of a table.")
def doctor(names: tuple[str, ...], modules_dir: Path, as_json: bool) -> None:
    """Check this machine can run xtransit: privileges, BPF, kernel headers for bcc, XDP attach
    (native and generic), AF_XDP, libcrypto AES-GCM and the strongSwan test peer."""
    checks = dict(d.CHECKS)
    checks["kernel-headers"] = lambda: d.check_kernel_headers(modules_dir)
    results = d.run(list(names) or None, checks)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        for line in render(results):
            click.echo(line)
    raise SystemExit(d.exit_status(results))
