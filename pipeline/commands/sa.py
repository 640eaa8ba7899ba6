"""`xtransit sa`: the IKE and Child SAs of the running daemon.

* ``sa list -c CONFIG [--json]`` reads ``/run/xtransit/<node name>/status.json``, which the daemon
  rewrites every second (pipeline/run.py; rows from pipeline/ike/export.py ``sa_rows``, no keys),
  and prints each IKE SA with its Child SAs: SPIs, algorithms, peer, NAT-T, age, bytes (from the
  native ESP data path's per-SA counters in the same file).
* ``sa export-keys --wireshark DIR -c CONFIG`` asks the daemon over its control socket
  (pipeline/control.py) for the keys of every IKE and Child SA and writes Wireshark's
  ``ikev2_decryption_table`` and ``esp_sa`` files into DIR (mode 0600). Only the file paths and a
  warning are printed, never a key.

Exit status: 0, 1 when no daemon runs for the node (or it refuses), 2 for an invalid config.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import click

from ..config import ConfigError, load

EXIT_NO_DAEMON = 1
EXIT_INVALID = 2
IKE_FILE = "ikev2_decryption_table"
ESP_FILE = "esp_sa"


def _run_root() -> Path:
    from ..run import RUN_ROOT
    return RUN_ROOT


def _node(config_file: str) -> str:
    try:
        return load(config_file).node.name
    except ConfigError as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        raise SystemExit(EXIT_INVALID) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NoDaemon(Exception):
    pass


def read_status(node: str, run_root: Path | None = None) -> dict[str, Any]:
    """The running daemon's status file; NoDaemon (with the reason) when there is none."""
    path = (run_root or _run_root()) / node / "status.json"
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoDaemon(f"no running xtransit daemon for node {node!r}: {path} does not exist "
                       "(start one with `xtransit run -c CONFIG`)") from None
    except PermissionError:
        raise NoDaemon(f"{path}: permission denied (run as root)") from None
    except (OSError, ValueError) as e:
        raise NoDaemon(f"{path}: unreadable status file ({e})") from None
    pid = status.get("pid") if isinstance(status, dict) else None
    if not isinstance(pid, int) or not _alive(pid):
        raise NoDaemon(f"no running xtransit daemon for node {node!r}: the daemon that wrote "
                       f"{path} (pid {pid}) is not running")
    return status


def with_bytes(status: dict[str, Any]) -> list[dict[str, Any]]:
    """``ike_sas`` with each Child SA's bytes taken from the data path's per-SA counters (the
    inbound SA by its SPI, the outbound one by the SPI it sends with)."""
    counters: dict[tuple[str, int], int] = {}
    for t in ((status.get("ipsec") or {}).get("tunnels") or {}).values():
        for s in t.get("sas", ()):
            counters[(s["direction"], int(s["spi"]))] = int(s["bytes"])
    rows = [dict(r) for r in status.get("ike_sas") or ()]
    for r in rows:
        r["children"] = [dict(c) for c in r.get("children", ())]
        for c in r["children"]:
            c["bytes_in"] = counters.get(("in", int(c["spi_in"], 16)), c.get("bytes_in", 0))
            c["bytes_out"] = counters.get(("out", int(c["spi_out"], 16)), c.get("bytes_out", 0))
    return rows


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


_TS = re.compile(r"^(\S+)-(\S+) proto (\d+) ports (\d+)-(\d+)$")


def _ts(text: str) -> str:
    """``10.10.2.0-10.10.2.255 proto 0 ports 0-65535`` as ``10.10.2.0/24`` (any protocol and
    port left out); anything else as it is."""
    m = _TS.match(text)
    if m is None:
        return text
    try:
        nets = list(ipaddress.summarize_address_range(ipaddress.ip_address(m[1]),
                                                      ipaddress.ip_address(m[2])))
    except (TypeError, ValueError):
        return text
    out = str(nets[0]) if len(nets) == 1 else f"{m[1]}-{m[2]}"
    if m[3] != "0":
        out += f" proto {m[3]}"
    if (m[4], m[5]) != ("0", "65535"):
        out += f" ports {m[4]}-{m[5]}"
    return out


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def render(rows: list[dict[str, Any]]) -> list[str]:
    """Each IKE SA on one line, its Child SAs indented below it."""
    if not rows:
        return ["no IKE SAs"]
    out: list[str] = []
    for r in rows:
        out += _table([
            ["TUNNEL", "IKE SPI I", "IKE SPI R", "STATE", "ROLE", "LOCAL", "PEER", "NAT-T",
             "ALGORITHMS", "AGE"],
            [r.get("tunnel") or "-", r["ike_spi_i"], r["ike_spi_r"], r["state"], r["role"],
             r["local"], r["peer"], "yes" if r["nat_t"] else "no", r["algorithms"],
             _age(r["age_s"])]])
        children = [["CHILD SPI IN", "SPI OUT", "ALGORITHMS", "PFS", "AGE", "BYTES IN",
                     "BYTES OUT", "TRAFFIC (local === remote)"]]
        for c in r["children"]:
            children.append([
                c["spi_in"], c["spi_out"], c["algorithms"], c.get("pfs") or "-", _age(c["age_s"]),
                str(c["bytes_in"]), str(c["bytes_out"]),
                " === ".join(",".join(map(_ts, c[k])) for k in ("ts_local", "ts_remote"))])
        out += _table(children, "  ") if len(children) > 1 else ["  no Child SAs"]
        out.append("")
    return out[:-1]


@click.group("sa")
def sa() -> None:
    """IKE and Child SAs of the running daemon (`xtransit run`)."""


@sa.command("list")
@click.option("--config", "-c", "config_file", required=True,
              type=click.Path(dir_okay=False, path_type=str), help="Configuration file (TOML).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of IKE SAs.")
def list_(config_file: str, as_json: bool) -> None:
    """IKE SAs with their Child SAs: SPIs, algorithms, peer, NAT-T, age, bytes. No keys."""
    node = _node(config_file)
    try:
        status = read_status(node)
    except NoDaemon as e:
        click.echo(f"xtransit sa list: {e}", err=True)
        raise SystemExit(EXIT_NO_DAEMON) from None
    rows = with_bytes(status)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in render(rows):
        click.echo(line)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)          # a file that existed keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
    finally:
        if fd >= 0:
            os.close(fd)


@sa.command("export-keys")
@click.option("--config", "-c", "config_file", required=True,
              type=click.Path(dir_okay=False, path_type=str), help="Configuration file (TOML).")
@click.option("--wireshark", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help=f"Directory for Wireshark's {IKE_FILE} and {ESP_FILE} files (created if "
                   "missing).")
def export_keys(config_file: str, directory: Path) -> None:
    """Write the keys of every IKE and Child SA for Wireshark (debugging only).

    The files hold keys (mode 0600): anyone who reads them can decrypt this node's IKE and ESP
    traffic. Copy them into Wireshark's personal configuration directory (e.g.
    ~/.config/wireshark/) and delete them when done."""
    from .. import control
    node = _node(config_file)
    sock = control.socket_path(_run_root(), node)
    try:
        answer = control.request(sock, "export-keys")
    except control.ControlError as e:
        msg = str(e)
        if "no control socket" in msg or "nothing listens" in msg:
            msg = f"no running xtransit daemon for node {node!r} ({msg})"
        click.echo(f"xtransit sa export-keys: {msg}", err=True)
        raise SystemExit(EXIT_NO_DAEMON) from None
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = []
        for name, key in ((IKE_FILE, "ikev2_decryption_table"), (ESP_FILE, "esp_sa")):
            p = directory / name
            _write_private(p, answer.get(key, ""))
            paths.append(p)
    except OSError as e:
        for p in (directory / IKE_FILE, directory / ESP_FILE):
            with contextlib.suppress(OSError):
                p.unlink()
        click.echo(f"xtransit sa export-keys: {e.filename or directory}: {e.strerror or e}",
                   err=True)
        raise SystemExit(1) from None
    for p in paths:
        click.echo(str(p))
    n_ike = len(answer.get("ikev2_decryption_table", "").splitlines())
    n_esp = len(answer.get("esp_sa", "").splitlines())
    click.echo(f"warning: these files hold the keys of {n_ike} IKE SA(s) and {n_esp} ESP SA(s) "
               "(mode 0600): anyone who reads them can decrypt this node's traffic; delete them "
               "when done", err=True)
