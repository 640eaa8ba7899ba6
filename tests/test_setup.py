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
# Modules Debian installs next to bcc in dist-packages (python3-apt, python3-yaml, python3-netaddr
# are on this machine); none of them may leak into the virtualenv.
DEBIAN_ONLY = ["apt", "apt_pkg", "yaml", "netaddr"]


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


@pytest.mark.parametrize("module", DEBIAN_ONLY)
def test_other_debian_modules_are_not_importable_in_the_venv(module):
    # Precondition, so this test cannot pass vacuously: Debian's python has the module.
    assert any((DEBIAN_DIST / n).exists() for n in (module, f"{module}.py")) or any(
        DEBIAN_DIST.glob(f"{module}.cpython-*.so")), f"{module} is not in {DEBIAN_DIST}"
    sys_r = _py(SYSTEM_PY, f"import {module}")
    assert sys_r.returncode == 0, sys_r.stderr
    r = _py(VENV_PY, f"import {module}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"ModuleNotFoundError: No module named '{module}'"
