"""cffi (API mode) build script for the AF_XDP worker ``pipeline._xsk`` (native/xsk.h, xsk.c).

setup.py lists every native/build_*.py, so ``make setup`` builds it, linked against the system
libxdp (the xsk API) and libbpf (XSKMAP update). The cdef is native/xsk.h itself minus the
preprocessor lines (integer ``#define``s are kept). The module does not link the ESP code: the
worker calls the ESP batch functions of ``pipeline._esp`` through pointers (see xsk.h).

Run directly (``python native/build_xsk.py OUTDIR``) to build a copy into OUTDIR.
"""
import os
import re
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def cdef_from_header(text: str) -> str:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = re.match(r"#define\s+(XT_\w+)\s+(-?(?:0x[0-9a-fA-F]+|\d+))\b", s)
            if m:
                out.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        out.append(line)
    return "\n".join(out)


def _rel(p: Path) -> str:
    if __name__ == "__main__":
        return str(p)
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


ffi = FFI()
ffi.cdef(cdef_from_header((HERE / "xsk.h").read_text()))
ffi.set_source(
    "pipeline._xsk",
    '#include "xsk.h"\n',
    sources=[_rel(HERE / "xsk.c")],
    include_dirs=[_rel(HERE)],
    libraries=["xdp", "bpf"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    depends=[_rel(HERE / h) for h in ("xsk.h", "esp.h")],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".", verbose=True)
