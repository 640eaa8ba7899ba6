"""`xtransit doctor`: can this machine run xtransit?

Each check is a small function returning a :class:`Result` (name, PASS/FAIL/WARN, what was found,
and a one-line fix). Checks take the paths they look at as parameters, so a test can point one at
a missing file and see it fail, without breaking the machine. Nothing here is simulated: the XDP
checks attach a real program to a real veth pair in a scratch namespace (removed again), the
crypto check runs an AES-GCM known-answer test through libcrypto.

Required checks FAIL; the strongSwan peer (only needed by tests and the demo) can only WARN.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import faulthandler
import importlib
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE_SRC = REPO / "bpf" / "doctor_probe.c"
PROBE_FUNC = "xdp_doctor_probe"
PROBE_ETHERTYPE = 0x88B5            # IEEE 802 local experimental EtherType
SHARED = REPO.parent / "shared"

# linux/capability.h
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
# linux/if_xdp.h, linux/if_link.h
AF_XDP = 44
XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 0, 1 << 1, 1 << 2
# IFLA_XDP_ATTACHED values (XDP_ATTACHED_*), under the names pyroute2 decodes them to
XDP_ATTACHED = {0: "none", 1: "xdp", 2: "xdpgeneric", 3: "xdpoffload", 4: "xdpmulti"}
XDP_MODES = {"native": (XDP_FLAGS_DRV_MODE, "xdp"), "generic": (XDP_FLAGS_SKB_MODE, "xdpgeneric")}
# linux/bpf.h
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2
_NR_BPF = {"x86_64": 321, "aarch64": 280}

FIX_SETUP = "make setup"
_EPERM = os.strerror(errno.EPERM)       # "Operation not permitted"
_CLANG_ERROR = re.compile(r":\d+:\d+: (fatal )?error: ")    # file:line:col: error: ...


class Status(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    WARN = "WARN"


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    detail: str
    fix: str = ""           # one line; empty when there is nothing to fix

    @property
    def ok(self) -> bool:
        return self.status is not Status.FAIL


def _pass(name: str, detail: str) -> Result:
    return Result(name, Status.PASS, detail)


def _fail(name: str, detail: str, fix: str) -> Result:
    return Result(name, Status.FAIL, detail, fix)


# --- privileges ----------------------------------------------------------------------------------

def check_privileges(status_file: Path = Path("/proc/self/status")) -> Result:
    """Effective capabilities: CAP_NET_ADMIN plus CAP_BPF (or CAP_SYS_ADMIN, which covers BPF on
    kernels before 5.8). Root normally has all of them; a container may not."""
    name = "privileges"
    fix = ("run as root, or grant CAP_NET_ADMIN and CAP_BPF "
           "(systemd AmbientCapabilities=CAP_NET_ADMIN CAP_BPF)")
    try:
        lines = status_file.read_text().splitlines()
    except OSError as e:
        return _fail(name, f"cannot read {status_file}: {e.strerror}", fix)
    eff = next((ln.split()[1] for ln in lines if ln.startswith("CapEff:")), None)
    if eff is None:
        return _fail(name, f"no CapEff line in {status_file}", fix)
    caps = int(eff, 16)
    have = {n: bool(caps >> b & 1) for n, b in (("CAP_NET_ADMIN", CAP_NET_ADMIN),
                                                ("CAP_BPF", CAP_BPF),
                                                ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))}
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    bpf = "CAP_BPF" if have["CAP_BPF"] else "CAP_SYS_ADMIN" if have["CAP_SYS_ADMIN"] else None
    if have["CAP_NET_ADMIN"] and bpf:
        return _pass(name, f"{who} with CAP_NET_ADMIN and {bpf}")
    missing = [n for n in ("CAP_NET_ADMIN", "CAP_BPF") if not have[n]]
    return _fail(name, f"{who} without {' and '.join(missing)} (CapEff {eff})", fix)


# --- BPF syscall and JIT -------------------------------------------------------------------------

def check_bpf_syscall() -> Result:
    """bpf(BPF_MAP_CREATE) of a one-slot array map, then close it: the syscall works for us."""
    name = "bpf syscall"
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        return _fail(name, f"unsupported architecture {platform.machine()}",
                     "run on x86_64 or aarch64")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = (ctypes.c_uint32 * 32)()     # union bpf_attr, zero padded (128 bytes)
    attr[0], attr[1], attr[2], attr[3] = BPF_MAP_TYPE_ARRAY, 4, 8, 1
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(BPF_MAP_CREATE), ctypes.byref(attr),
                      ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        fix = {errno.EPERM: "run as root or grant CAP_BPF",
               errno.ENOSYS: "use a kernel built with CONFIG_BPF_SYSCALL=y"}.get(
            err, "check dmesg and the kernel's BPF configuration")
        return _fail(name, f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)}", fix)
    os.close(fd)
    return _pass(name, "bpf(BPF_MAP_CREATE) of an array map succeeded")


def check_bpf_jit(jit_file: Path = Path("/proc/sys/net/core/bpf_jit_enable")) -> Result:
    name = "bpf jit"
    try:
        value = jit_file.read_text().strip()
    except FileNotFoundError:
        return _fail(name, f"{jit_file} is missing: the kernel has no BPF JIT",
                     "use a kernel built with CONFIG_BPF_JIT=y")
    except OSError as e:
        return _fail(name, f"cannot read {jit_file}: {e.strerror}", "run as root")
    if value in ("1", "2"):
        return _pass(name, f"{jit_file} = {value}")
    return _fail(name, f"{jit_file} = {value}: BPF programs would be interpreted",
                 "sysctl -w net.core.bpf_jit_enable=1")


# --- kernel headers for bcc ----------------------------------------------------------------------

_COMPILE = ("import sys\n"
            "from bcc import BPF\n"
            "b = BPF(src_file=sys.argv[1].encode(), cflags=sys.argv[3:])\n"
            "b.load_func(sys.argv[2], BPF.XDP)\n")


def _probe_cflags() -> list[str]:
    return [f"-DDOCTOR_ETHERTYPE={PROBE_ETHERTYPE:#06x}"]


SYSTEM_MODULES_DIR = Path("/lib/modules")


def check_kernel_headers(modules_dir: Path = SYSTEM_MODULES_DIR, release: str | None = None,
                         python: str = sys.executable, probe: Path = PROBE_SRC,
                         timeout: float = 120) -> Result:
    """bcc compiles against /lib/modules/<release>/build (and its ``source`` sibling, where
    Debian keeps the architecture-independent half). Check the link, then compile and load a tiny
    XDP program with bcc in a child process."""
    name = "kernel headers"
    release = release or os.uname().release
    build = modules_dir / release / "build"
    fix = f"{FIX_SETUP}  (installs linux-headers-amd64 and links {build} to it)"
    if not build.exists():
        if build.is_symlink():
            return _fail(name, f"{build} is a dangling link to {os.readlink(build)}", fix)
        return _fail(name, f"{build} is missing: bcc cannot compile XDP programs", fix)
    cmd = [python, "-c", _COMPILE, str(probe), PROBE_FUNC, *_probe_cflags()]
    if modules_dir.resolve() != SYSTEM_MODULES_DIR.resolve():
        # bcc only looks in /lib/modules/<release>/{build,source}: show it modules_dir there, in
        # a private mount namespace of the child, so exactly bcc's own lookup is exercised.
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
               f'mount --bind "$0" {SYSTEM_MODULES_DIR} && exec "$@"', str(modules_dir), *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return _fail(name, f"compiling a tiny program with bcc took over {timeout:.0f}s", fix)
    except OSError as e:
        return _fail(name, f"cannot run {cmd[0]}: {e.strerror}", FIX_SETUP)
    target = build.resolve()
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in lines if "kernel headers" in ln or _CLANG_ERROR.search(ln)), None)
        if why is None and _EPERM in proc.stderr:
            # Compiled: bcc got as far as creating the program's map. The headers are fine;
            # the privileges check names what is missing.
            return _pass(name, f"bcc compiled an XDP program against {build} -> {target} "
                               f"(not loaded: {_EPERM}, see privileges)")
        why = why or (lines[-1] if lines else f"exit status {proc.returncode}")
        return _fail(name, f"bcc could not compile against {build}: {why}", fix)
    return _pass(name, f"bcc compiled and loaded an XDP program against {build} -> {target}")


# --- XDP attach on a scratch veth pair -----------------------------------------------------------

def _xdp_attached(ns, ifname: str) -> str:
    """IFLA_XDP_ATTACHED of an interface in a namespace, by name ("none" when nothing is)."""
    with ns.ipr() as ipr:
        link = ipr.get_links(ns.index(ifname))[0]
    xdp = link.get("IFLA_XDP")
    mode = xdp.get("IFLA_XDP_ATTACHED") if xdp is not None else None
    if isinstance(mode, int):
        return XDP_ATTACHED.get(mode, str(mode))
    return mode or "none"


def check_xdp(mode: str, probe: Path = PROBE_SRC, python: str = sys.executable,
              timeout: float = 60.0) -> Result:
    """Attach the probe in ``mode`` ("native" or "generic") to one end of a veth pair in a scratch
    namespace, check the kernel reports that mode, send one frame from the other end and see the
    program count it, detach; the namespace and the pair are removed on every path.

    Runs in a child process (``python -m pipeline.doctor xdp MODE PROBE``) so that the doctor
    itself can never hang on it: past ``timeout`` the child gets SIGTERM (which unwinds its
    cleanup), then SIGKILL, and namespaces of dead processes are swept."""
    name = f"xdp {mode}"
    if mode not in XDP_MODES:
        raise ValueError(f"mode must be one of {sorted(XDP_MODES)}, not {mode!r}")
    proc = subprocess.Popen([python, "-m", "pipeline.doctor", "xdp", mode, str(probe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        from . import netns
        with contextlib.suppress(OSError):
            netns.sweep_stale()
        return _fail(name, f"did not finish within {timeout:g}s (stopped; {_last_line(err)})",
                     "report this as a bug, with the output of `xtransit doctor --check xdp-"
                     f"{mode}`")
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        data = json.loads(last)
        r = Result(data["name"], Status(data["status"]), data["detail"], data["fix"])
    except (ValueError, KeyError, TypeError):
        return _fail(name, f"the check process exited {proc.returncode}: {_last_line(err)}",
                     "report this as a bug")
    if r.status is Status.FAIL and _EPERM in err:
        # bcc reports a refused bpf() only on stderr; its exception just says "failed".
        return _fail(name, f"{r.detail} ({_EPERM})", "run as root, or grant CAP_NET_ADMIN and "
                                                     "CAP_BPF (see the privileges check)")
    return r


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


_MAC_XD0, _MAC_XD1 = "02:00:00:00:d0:00", "02:00:00:00:d0:01"   # locally administered


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _xdp_here(mode: str, probe: Path = PROBE_SRC, wait: float = 2.0) -> Result:
    """The XDP check itself, in this process (see check_xdp)."""
    name = f"xdp {mode}"
    flags, want = XDP_MODES[mode]
    try:
        from bcc import BPF
    except ImportError as e:
        return _fail(name, f"bcc is not importable: {e}", FIX_SETUP)
    from . import netns

    fix = ("use a kernel with native XDP on veth (5.9 or later)" if mode == "native"
           else "use a kernel with XDP support (4.12 or later, CONFIG_BPF_SYSCALL=y)")
    try:
        b = BPF(src_file=str(probe).encode(), cflags=_probe_cflags())
        fn = b.load_func(PROBE_FUNC.encode(), BPF.XDP)
    except Exception as e:  # noqa: BLE001 - bcc raises plain Exception for compile/load errors
        return _fail(name, f"cannot compile or load the probe: {e}",
                     "see the privileges and kernel headers checks above")
    try:
        with netns.Lab("doctor") as lab:
            ns = lab.namespace("doctor")
            lab.veth(ns, "xd0", ns, "xd1", mac_a=_MAC_XD0, mac_b=_MAC_XD1)
            try:
                with ns.enter():
                    b.attach_xdp(b"xd0", fn, flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
            except Exception as e:  # noqa: BLE001 - bcc raises plain Exception
                return _fail(name, f"attach to a veth failed: {e}", fix)
            try:
                got = _xdp_attached(ns, "xd0")
                if got != want:
                    return _fail(name, f"kernel reports XDP attach mode {got!r}, wanted {want!r}",
                                 fix)
                frame = (_mac(_MAC_XD0) + _mac(_MAC_XD1) + PROBE_ETHERTYPE.to_bytes(2, "big")
                         + b"xtransit doctor".ljust(46, b"\0"))    # minimum 60-byte frame
                lab.port(ns, "xd1").send(frame)
                seen = b[b"seen"]
                deadline = time.monotonic() + wait
                while seen[0].value < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                count = seen[0].value
            finally:
                with ns.enter():
                    b.remove_xdp(b"xd0", flags)
            if count != 1:
                return _fail(name, f"attached, but the program saw {count} of 1 frame sent", fix)
            scratch = ns.name
    except netns.NetnsError as e:
        return _fail(name, f"cannot build the scratch namespace: {e}",
                     "run as root with iproute2 installed (make setup)")
    finally:
        b.cleanup()
    return _pass(name, f"attached to a veth pair in scratch namespace {scratch}, "
                       "counted 1 frame, detached and removed")


# --- AF_XDP --------------------------------------------------------------------------------------

def check_af_xdp(family: int = AF_XDP) -> Result:
    name = "af_xdp socket"
    try:
        s = socket.socket(family, socket.SOCK_RAW, 0)
    except OSError as e:
        fix = ("use a kernel built with CONFIG_XDP_SOCKETS=y"
               if e.errno in (errno.EAFNOSUPPORT, errno.EINVAL) else "run as root")
        return _fail(name, f"socket(family {family}, SOCK_RAW) failed: {e.strerror}", fix)
    s.close()
    return _pass(name, f"socket(AF_XDP={family}, SOCK_RAW) created")


# --- libcrypto AES-GCM ---------------------------------------------------------------------------

# The GCM specification (McGrew and Viega), test case 2: zero key, zero IV, one zero block.
_GCM_KEY, _GCM_IV, _GCM_PT = bytes(16), bytes(12), bytes(16)
_GCM_CT = bytes.fromhex("0388dace60b6a392f328c2b971b2fe78")
_GCM_TAG = bytes.fromhex("ab6e47d42cec13bdf53a67b21257bddf")
EVP_CTRL_GCM_SET_IVLEN, EVP_CTRL_GCM_GET_TAG = 0x9, 0x10


def _gcm_encrypt(lib: ctypes.CDLL, key: bytes, iv: bytes, pt: bytes) -> tuple[bytes, bytes]:
    vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    lib.EVP_aes_128_gcm.restype = vp
    lib.EVP_CIPHER_CTX_new.restype = vp
    lib.EVP_CIPHER_CTX_free.argtypes = [vp]
    lib.EVP_EncryptInit_ex.argtypes = [vp, vp, vp, cp, cp]
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ip, ip, vp]
    lib.EVP_EncryptUpdate.argtypes = [vp, cp, ctypes.POINTER(ip), cp, ip]
    lib.EVP_EncryptFinal_ex.argtypes = [vp, cp, ctypes.POINTER(ip)]
    cipher = lib.EVP_aes_128_gcm()
    if not cipher:
        raise RuntimeError("EVP_aes_128_gcm() returned NULL")
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:
        raise RuntimeError("EVP_CIPHER_CTX_new() returned NULL")
    try:
        out, tag, n, fin = (ctypes.create_string_buffer(len(pt) + 16),
                            ctypes.create_string_buffer(16), ip(0), ip(0))
        steps = (
            ("EncryptInit", lambda: lib.EVP_EncryptInit_ex(ctx, cipher, None, None, None)),
            ("SET_IVLEN", lambda: lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, len(iv),
                                                          None)),
            ("EncryptInit(key, iv)", lambda: lib.EVP_EncryptInit_ex(ctx, None, None, key, iv)),
            ("EncryptUpdate", lambda: lib.EVP_EncryptUpdate(ctx, out, ctypes.byref(n), pt,
                                                            len(pt))),
            ("EncryptFinal", lambda: lib.EVP_EncryptFinal_ex(ctx, None, ctypes.byref(fin))),
            ("GET_TAG", lambda: lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16,
                                                        ctypes.cast(tag, vp))),
        )
        for what, step in steps:
            if step() != 1:
                raise RuntimeError(f"EVP {what} failed")
        return out.raw[:n.value], tag.raw
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def check_libcrypto_gcm(libname: str = "libcrypto.so.3",
                        native_module: str | None = "pipeline._esp") -> Result:
    """AES-128-GCM through the system libcrypto gives the published answer, and the native ESP
    module (which links that libcrypto) imports."""
    name = "libcrypto aes-gcm"
    fix = f"{FIX_SETUP}  (installs libssl-dev and builds the native ESP module)"
    try:
        lib = ctypes.CDLL(libname)
    except OSError as e:
        return _fail(name, f"cannot load {libname}: {e}", fix)
    try:
        ct, tag = _gcm_encrypt(lib, _GCM_KEY, _GCM_IV, _GCM_PT)
    except (AttributeError, RuntimeError) as e:
        return _fail(name, f"{libname}: {e}", fix)
    if (ct, tag) != (_GCM_CT, _GCM_TAG):
        return _fail(name, f"{libname}: AES-128-GCM known answer mismatch "
                           f"(ct {ct.hex()}, tag {tag.hex()})", "reinstall libssl3")
    lib.OpenSSL_version.restype = ctypes.c_char_p
    version = lib.OpenSSL_version(0).decode()
    detail = f"{version}: AES-128-GCM known answer matches"
    if native_module:
        if importlib.util.find_spec(native_module) is None:
            return _fail(name, f"{detail}; native module {native_module} is not built", fix)
        try:
            importlib.import_module(native_module)
        except ImportError as e:
            return _fail(name, f"{detail}; native module {native_module} does not load: {e}", fix)
        detail += f"; native module {native_module} loads"
    return _pass(name, detail)


# --- strongSwan test peer (WARN only) ------------------------------------------------------------

def check_strongswan(swanctl: Path = Path("/usr/sbin/swanctl"),
                     charon: Path = Path("/usr/lib/ipsec/charon"),
                     peer_sh: Path = SHARED / "peers" / "strongswan" / "peer.sh") -> Result:
    name = "strongswan peer"
    missing = [str(p) for p in (swanctl, charon) if not os.access(p, os.X_OK)]
    if not peer_sh.is_file():
        missing.append(str(peer_sh))
    if missing:
        return Result(name, Status.WARN, f"missing {', '.join(missing)} (only the interop tests "
                                         "and the demo need it)", FIX_SETUP)
    return _pass(name, f"{swanctl}, {charon} and {peer_sh} present")


# --- all together --------------------------------------------------------------------------------

CHECKS: dict[str, Callable[[], Result]] = {
    "privileges": check_privileges,
    "bpf-syscall": check_bpf_syscall,
    "bpf-jit": check_bpf_jit,
    "kernel-headers": check_kernel_headers,
    "xdp-native": lambda: check_xdp("native"),
    "xdp-generic": lambda: check_xdp("generic"),
    "af-xdp": check_af_xdp,
    "libcrypto": check_libcrypto_gcm,
    "strongswan": check_strongswan,
}


def run(names: list[str] | None = None,
        checks: dict[str, Callable[[], Result]] | None = None, workers: int = 3) -> list[Result]:
    """Run the named checks (all by default); results come back in the order asked for.

    The slow checks (bcc compiles, XDP attach) each run in a child process, so running checks on
    a few threads overlaps them. A check that raises unexpectedly becomes a FAIL naming the
    exception, so one broken check never hides the others."""
    checks = checks or CHECKS

    def one(key: str) -> Result:
        try:
            return checks[key]()
        except Exception as e:  # noqa: BLE001 - a doctor must report, not crash
            return _fail(key, f"the check itself failed: {type(e).__name__}: {e}",
                         "report this as a bug")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, names or list(checks)))


def exit_status(results: list[Result]) -> int:
    return 0 if all(r.ok for r in results) else 1


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _child(argv: list[str]) -> int:
    """``python -m pipeline.doctor xdp MODE PROBE``: run one XDP check, print it as JSON."""
    if len(argv) != 3 or argv[0] != "xdp" or argv[1] not in XDP_MODES:
        print(f"usage: python -m pipeline.doctor xdp {{{'|'.join(XDP_MODES)}}} PROBE.c",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)   # unwind the Lab's cleanup on SIGTERM
    faulthandler.register(signal.SIGUSR1)              # where is it stuck? kill -USR1 <pid>
    r = _xdp_here(argv[1], Path(argv[2]))
    print(json.dumps(dataclasses.asdict(r)))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))

