"""The virtualenv `make setup` builds: Debian's bcc is importable in .venv, and nothing else of
Debian's dist-packages is (the PyPI `bcc` is an unrelated project, so bcc comes from Debian
through a folder that holds only `bcc`)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
DEBIAN_DIST = Path("/usr/lib/python3/dist-packages")
SYSTEM_PY = "/usr/bin/python3"


def _debian_modules() -> list[str]:
    """Top-level modules in Debian's dist-packages other than bcc (apt, yaml, ... here)."""
    names = set()
    for p in DEBIAN_DIST.iterdir() if DEBIAN_DIST.is_dir() else ():
        if p.name.endswith((".dist-info", ".egg-info", ".pth")) or p.name == "__pycache__":
            continue
        if p.is_dir() and not (p / "__init__.py").exists():
            continue
        names.add(p.name.split(".")[0])
    names.discard("bcc")
    return sorted(names)


def _py(python: str | Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)


def test_bcc_imports_in_the_venv_from_debian():
    r = _py(VENV_PY, "import bcc, os; print(os.path.realpath(bcc.__file__)); "
                     "print(bcc.BPF.XDP)")
    assert r.returncode == 0, r.stderr
    path, xdp = r.stdout.split()
    assert path == str(DEBIAN_DIST / "bcc" / "__init__.py")
    assert xdp == "6"          # BPF_PROG_TYPE_XDP


def test_the_bcc_folder_holds_only_bcc():
    r = _py(VENV_PY, "import bcc, os; print(os.path.dirname(os.path.dirname(bcc.__file__)))")
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    assert folder != DEBIAN_DIST
    assert sorted(p.name for p in folder.iterdir()) == ["bcc"]


def test_debian_dist_packages_not_on_the_venv_path():
    r = _py(VENV_PY, "import sys, os; print('\\n'.join(os.path.realpath(p) for p in sys.path))")
    assert r.returncode == 0, r.stderr
    assert str(DEBIAN_DIST) not in r.stdout.splitlines()


def test_nothing_else_of_debian_dist_packages_is_importable_in_the_venv():
    """Every other module Debian installed is either missing in the venv or comes from the venv's
    own site-packages (pip, setuptools, cryptography, ...), never from Debian's folder."""
    names = _debian_modules()
    leaked = _py(VENV_PY, f"""
import importlib, os
for name in {names!r}:
    try:
        m = importlib.import_module(name)
    except Exception:
        continue
    f = getattr(m, "__file__", None) or ""
    if os.path.realpath(f).startswith({str(DEBIAN_DIST)!r} + "/"):
        print(name)
""")
    assert leaked.returncode == 0, leaked.stderr
    assert leaked.stdout.split() == []


def test_a_debian_only_module_really_differs():
    """The check above is not vacuous here: python3-apt is in Debian's python, not in the venv."""
    if not (DEBIAN_DIST / "apt").is_dir():
        pytest.skip("python3-apt is not installed on this machine")
    assert _py(SYSTEM_PY, "import apt").returncode == 0
    r = _py(VENV_PY, "import apt")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: No module named 'apt'"
