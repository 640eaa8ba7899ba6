"""`xtransit doctor`: every check passes on this machine, and each one fails with its fix when its
precondition is broken (pointed at a missing or wrong path, or run without the capabilities)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline import doctor as d
from pipeline import netns
from pipeline.cli import cli

REPO = Path(__file__).resolve().parent.parent
XTRANSIT = REPO / ".venv" / "bin" / "xtransit"
RELEASE = os.uname().release
SYSTEM_BUILD = Path("/lib/modules") / RELEASE / "build"
PEER_SH = REPO.parent / "shared" / "peers" / "strongswan" / "peer.sh"
STATUSES = ("PASS", "FAIL", "WARN")
ALL = ["privileges", "bpf syscall", "bpf jit", "kernel headers", "xdp native", "xdp generic",
       "af_xdp socket", "libcrypto aes-gcm", "strongswan peer"]


def _doctor_namespaces() -> list[str]:
    """Scratch namespaces of doctor processes that are gone: leaks. (The XDP checks run in a
    child process, so the name carries the child's pid; live concurrent runs are not counted.)"""
    return [n for n in netns.ours()
            if n.startswith("xtdoctor-") and not Path(f"/proc/{n.split('-')[1]}").exists()]


# --- the whole doctor on this machine ------------------------------------------------------------

@pytest.mark.netns
def test_all_checks_pass_here_real_process():
    """The acceptance run: `xtransit doctor` as a real process passes every check here, including
    both XDP attach modes (a frame counted by the program each time), and leaves no namespace."""
    proc = subprocess.run([str(XTRANSIT), "doctor"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    rows = [(ln[:4], ln[6:6 + 17].rstrip(), ln[6 + 19:]) for ln in lines if ln[:4] in STATUSES]
    # The strongSwan peer lives outside the repository (../shared): without it, a WARN.
    peer = "PASS" if PEER_SH.is_file() else "WARN"
    assert [(st, nm) for st, nm, _ in rows] == [("PASS", n) for n in ALL[:-1]] + [(peer, ALL[-1])]
    details = {nm: det for _, nm, det in rows}
    for mode in ("native", "generic"):
        assert details[f"xdp {mode}"].endswith("counted 1 frame, detached and removed")
    assert details["kernel headers"].startswith(
        f"bcc compiled and loaded an XDP program against {SYSTEM_BUILD} -> ")
    warned = peer == "WARN"
    assert lines[-1] == f"9 checks: {9 - warned} passed, 0 failed, {int(warned)} warnings"
    assert _doctor_namespaces() == []


@pytest.mark.netns
def test_without_capabilities_privilege_and_bpf_checks_fail():
    """Drop CAP_NET_ADMIN, CAP_BPF and CAP_SYS_ADMIN from the bounding set: the real kernel then
    refuses bpf(), and the doctor says so with a fix."""
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin,-bpf,-sys_admin", "--", str(XTRANSIT), "doctor",
         "--check", "privileges", "--check", "bpf-syscall", "--check", "af-xdp",
         "--check", "kernel-headers", "--check", "xdp-generic"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln.rstrip() for ln in proc.stdout.splitlines()]
    assert lines[0].startswith("FAIL  privileges      root without CAP_NET_ADMIN and CAP_BPF")
    assert lines[1].strip() == ("fix: run as root, or grant CAP_NET_ADMIN and CAP_BPF "
                                "(systemd AmbientCapabilities=CAP_NET_ADMIN CAP_BPF)")
    assert lines[2] == ("FAIL  bpf syscall     bpf(BPF_MAP_CREATE) failed: "
                        "Operation not permitted")
    assert lines[3].strip() == "fix: run as root or grant CAP_BPF"
    assert lines[4] == "PASS  af_xdp socket   socket(AF_XDP=44, SOCK_RAW) created"
    # The headers are fine (bcc compiled); only loading was refused, and the XDP check says why.
    assert lines[5].startswith(f"PASS  kernel headers  bcc compiled an XDP program against "
                               f"{SYSTEM_BUILD} -> ")
    assert lines[5].endswith("(not loaded: Operation not permitted, see privileges)")
    assert lines[6].startswith("FAIL  xdp generic     cannot compile or load the probe: ")
    assert lines[6].endswith("(Operation not permitted)")
    assert lines[7].strip() == ("fix: run as root, or grant CAP_NET_ADMIN and CAP_BPF "
                                "(see the privileges check)")
    assert lines[-1] == "5 checks: 2 passed, 3 failed, 0 warnings"
    assert _doctor_namespaces() == []


# --- kernel headers ------------------------------------------------------------------------------

def test_headers_missing_build_link_fails_with_make_setup(tmp_path):
    (tmp_path / RELEASE).mkdir()
    r = d.check_kernel_headers(tmp_path)
    build = tmp_path / RELEASE / "build"
    assert r == d.Result("kernel headers", d.Status.FAIL,
                         f"{build} is missing: bcc cannot compile XDP programs",
                         f"make setup  (installs linux-headers-amd64 and links {build} to it)")


def test_headers_dangling_link(tmp_path):
    (tmp_path / RELEASE).mkdir()
    (tmp_path / RELEASE / "build").symlink_to(tmp_path / "gone")
    r = d.check_kernel_headers(tmp_path)
    assert r.status is d.Status.FAIL
    assert r.detail == f"{tmp_path / RELEASE / 'build'} is a dangling link to {tmp_path / 'gone'}"
    assert r.fix.startswith("make setup")


@pytest.mark.netns
def test_headers_link_to_a_directory_without_headers_fails_to_compile(tmp_path):
    (tmp_path / RELEASE / "build").mkdir(parents=True)
    r = d.check_kernel_headers(tmp_path)
    assert r.status is d.Status.FAIL
    assert r.detail.startswith(f"bcc could not compile against {tmp_path / RELEASE / 'build'}: ")
    assert "kconfig.h" in r.detail
    assert r.fix.startswith("make setup")


@pytest.mark.netns
def test_headers_pass_from_another_modules_dir_with_the_same_links(tmp_path):
    """The non-default path really compiles (so the failures above are not an artefact)."""
    if not SYSTEM_BUILD.exists():
        pytest.fail(f"{SYSTEM_BUILD} is missing: run make setup")
    (tmp_path / RELEASE).mkdir()
    (tmp_path / RELEASE / "build").symlink_to(SYSTEM_BUILD.resolve())
    source = SYSTEM_BUILD.parent / "source"
    if source.exists():
        (tmp_path / RELEASE / "source").symlink_to(source.resolve())
    r = d.check_kernel_headers(tmp_path)
    assert r.status is d.Status.PASS, r
    assert r.detail == (f"bcc compiled and loaded an XDP program against "
                        f"{tmp_path / RELEASE / 'build'} -> {SYSTEM_BUILD.resolve()}")


def test_cli_headers_missing_exit_1_with_fix(tmp_path):
    r = CliRunner().invoke(cli, ["doctor", "--check", "kernel-headers", "--modules-dir",
                                 str(tmp_path)])
    assert r.exit_code == 1
    build = tmp_path / RELEASE / "build"
    assert r.output.splitlines() == [
        f"FAIL  kernel headers  {build} is missing: bcc cannot compile XDP programs",
        (f"                      fix: make setup  (installs linux-headers-amd64 and links {build} "
        "to it)"),
        "",
        "1 check: 0 passed, 1 failed, 0 warnings",
    ]


def test_cli_json(tmp_path):
    r = CliRunner().invoke(cli, ["doctor", "--json", "--check", "kernel-headers", "--check",
                                 "strongswan", "--modules-dir", str(tmp_path)])
    assert r.exit_code == 1
    got = json.loads(r.stdout)
    peer = d.check_strongswan().status
    assert [(x["name"], x["status"]) for x in got] == [("kernel headers", "FAIL"),
                                                       ("strongswan peer", peer)]
    assert got[0]["fix"].startswith("make setup")


# --- privileges, BPF, JIT, AF_XDP ----------------------------------------------------------------

def _status(tmp_path: Path, capeff: str) -> Path:
    p = tmp_path / "status"
    p.write_text(f"Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{capeff}\n")
    return p


def test_privileges_without_caps(tmp_path):
    r = d.check_privileges(_status(tmp_path, "0000000000000000"))
    assert r.status is d.Status.FAIL
    assert r.detail.endswith("without CAP_NET_ADMIN and CAP_BPF (CapEff 0000000000000000)")
    assert "CAP_NET_ADMIN and CAP_BPF" in r.fix


def test_privileges_net_admin_and_bpf(tmp_path):
    r = d.check_privileges(_status(tmp_path, f"{(1 << 12) | (1 << 39):016x}"))
    assert r.status is d.Status.PASS and r.detail.endswith("with CAP_NET_ADMIN and CAP_BPF")


def test_privileges_sys_admin_stands_in_for_bpf(tmp_path):
    r = d.check_privileges(_status(tmp_path, f"{(1 << 12) | (1 << 21):016x}"))
    assert r.status is d.Status.PASS and r.detail.endswith("with CAP_NET_ADMIN and CAP_SYS_ADMIN")


def test_privileges_net_admin_only(tmp_path):
    r = d.check_privileges(_status(tmp_path, f"{1 << 12:016x}"))
    assert r.status is d.Status.FAIL and "without CAP_BPF (CapEff" in r.detail


def test_privileges_unreadable_status(tmp_path):
    r = d.check_privileges(tmp_path / "nope")
    assert r.status is d.Status.FAIL
    assert r.detail == f"cannot read {tmp_path / 'nope'}: No such file or directory"


@pytest.mark.parametrize("value,status", [("0", d.Status.FAIL), ("1", d.Status.PASS),
                                          ("2", d.Status.PASS)])
def test_bpf_jit_values(tmp_path, value, status):
    f = tmp_path / "bpf_jit_enable"
    f.write_text(value + "\n")
    r = d.check_bpf_jit(f)
    assert r.status is status
    if status is d.Status.FAIL:
        assert r.detail == f"{f} = 0: BPF programs would be interpreted"
        assert r.fix == "sysctl -w net.core.bpf_jit_enable=1"


def test_bpf_jit_missing(tmp_path):
    r = d.check_bpf_jit(tmp_path / "bpf_jit_enable")
    assert (r.status, r.fix) == (d.Status.FAIL, "use a kernel built with CONFIG_BPF_JIT=y")


def test_af_xdp_unknown_family_fails():
    r = d.check_af_xdp(family=250)
    assert r.status is d.Status.FAIL
    assert r.detail == ("socket(family 250, SOCK_RAW) failed: "
                        "Address family not supported by protocol")
    assert r.fix == "use a kernel built with CONFIG_XDP_SOCKETS=y"


# --- XDP -----------------------------------------------------------------------------------------

@pytest.mark.netns
def test_xdp_with_a_broken_probe_fails(tmp_path):
    bad = tmp_path / "probe.c"
    bad.write_text("int xdp_doctor_probe(struct xdp_md *ctx) { return XDP_PASS }\n")
    r = d.check_xdp("generic", probe=bad)
    assert r.status is d.Status.FAIL
    assert r.detail.startswith("cannot compile or load the probe: ")
    assert _doctor_namespaces() == []


@pytest.mark.netns
def test_xdp_check_is_bounded_in_time():
    r = d.check_xdp("generic", timeout=0.3)
    assert r.status is d.Status.FAIL
    assert r.detail.startswith("did not finish within 0.3s (stopped; ")
    assert r.fix == "report this as a bug, with the output of `xtransit doctor --check xdp-generic`"
    assert _doctor_namespaces() == []


def test_xdp_child_usage_error():
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "pipeline.doctor", "xdp",
                           "offload", "x.c"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "usage: python -m pipeline.doctor xdp {native|generic} PROBE.c"


# --- libcrypto -----------------------------------------------------------------------------------

def test_libcrypto_gcm_matches_an_independent_implementation():
    import ctypes
    lib = ctypes.CDLL("libcrypto.so.3")
    key, iv, pt = bytes(range(16)), bytes(range(100, 112)), b"xtransit doctor " * 5
    ct, tag = d._gcm_encrypt(lib, key, iv, pt)
    assert ct + tag == AESGCM(key).encrypt(iv, pt, None)


def test_libcrypto_missing_library_fails():
    r = d.check_libcrypto_gcm("libcrypto-does-not-exist.so.9")
    assert r.status is d.Status.FAIL
    assert r.detail.startswith("cannot load libcrypto-does-not-exist.so.9: ")
    assert r.fix.startswith("make setup")


def test_libcrypto_native_module_missing_fails():
    r = d.check_libcrypto_gcm(native_module="pipeline._not_built")
    assert r.status is d.Status.FAIL
    assert r.detail.endswith("native module pipeline._not_built is not built")


def test_libcrypto_passes_here():
    r = d.check_libcrypto_gcm()
    assert r.status is d.Status.PASS, r
    assert "AES-128-GCM known answer matches; native module pipeline._esp loads" in r.detail


# --- strongSwan (WARN only) and the runner -------------------------------------------------------

def test_strongswan_missing_is_a_warning_not_a_failure(tmp_path):
    r = d.check_strongswan(swanctl=tmp_path / "swanctl", charon=Path("/usr/lib/ipsec/charon"),
                           peer_sh=tmp_path / "peer.sh")
    assert r.status is d.Status.WARN
    assert r.detail.startswith(f"missing {tmp_path / 'swanctl'}, {tmp_path / 'peer.sh'}")
    assert d.exit_status([r]) == 0


def test_a_check_that_raises_becomes_a_fail_and_the_rest_still_run():
    def boom() -> d.Result:
        raise RuntimeError("boom")
    checks = {"boom": boom, "jit": d.check_bpf_jit}
    results = d.run(None, checks)
    assert results[0] == d.Result("boom", d.Status.FAIL,
                                  "the check itself failed: RuntimeError: boom",
                                  "report this as a bug")
    assert results[1].name == "bpf jit"
    assert d.exit_status(results) == 1
