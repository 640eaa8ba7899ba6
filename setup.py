"""Build hook for the native (cffi, API mode) modules.

Everything else lives in pyproject.toml. Each native module has a build script in native/
that exposes an ``ffi`` object (cffi ``FFI`` with ``set_source``); list it here and
``pip install -e .`` (run by ``make setup``) compiles it against the system libcrypto.
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CFFI_MODULES = [
    f"native/{p.name}:ffi" for p in sorted((HERE / "native").glob("build_*.py"))
]

setup(cffi_modules=CFFI_MODULES)
