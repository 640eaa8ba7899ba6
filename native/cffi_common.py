"""What the cffi build scripts (native/build_*.py) share: a header turned into a cdef, source
paths as setuptools or a direct run wants them, and the compiler flags.

Each native module's header is its cffi declaration: the cdef is the header minus preprocessor
lines (integer ``XT_`` ``#define``s are kept) and minus an optional C-only block.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_DEFINE = re.compile(r"#define\s+(XT_\w+)\s+(-?(?:0x[0-9a-fA-F]+|\d+))\b")


def cdef_from_header(text: str, c_only: str | None = None) -> str:
    """The header as cffi sees it. ``c_only``: a regex of a block to drop first (C-only parts)."""
    if c_only:
        text = re.sub(c_only, "", text, flags=re.DOTALL)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = _DEFINE.match(s)
            if m:
                out.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        out.append(line)
    return "\n".join(out)


def rel(p: Path, as_script: bool) -> str:
    """setuptools wants sources relative to the project root when it drives the build; run as a
    script, ffi.compile() changes into its output folder, so paths must be absolute there."""
    if as_script:
        return str(p)
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def module(name: str, header: str, sources: list[str], *, libraries: list[str],
           depends: list[str], as_script: bool, c_only: str | None = None,
           cflags: list[str] | None = None, ldflags: list[str] | None = None) -> FFI:
    """An FFI for ``pipeline.<name>`` built from native/<header> and native/<sources>."""
    ffi = FFI()
    ffi.cdef(cdef_from_header((HERE / header).read_text(), c_only))
    ffi.set_source(
        f"pipeline.{name}",
        f'#include "{header}"\n',
        sources=[rel(HERE / s, as_script) for s in sources],
        include_dirs=[rel(HERE, as_script)],
        libraries=libraries,
        extra_compile_args=cflags or CFLAGS,
        extra_link_args=ldflags or [],
        depends=[rel(HERE / h, as_script) for h in depends],
    )
    return ffi
