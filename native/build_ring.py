"""cffi (API mode) build script for the BPF ring buffer batch consumer ``pipeline._ring``
(native/ring.h, ring.c), used by the analytics sampler (pipeline/analytics/samples.py).

setup.py lists every native/build_*.py, so ``make setup`` builds it, linked against the system
libbpf (only for the map info call; the ring itself is read through mmap). The cdef is
native/ring.h itself minus the preprocessor lines (integer ``XT_`` #defines are kept).

Run directly (``python native/build_ring.py OUTDIR``) to build a copy into OUTDIR.
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
    # setuptools wants sources relative to the project root when it drives the build; run as a
    # script, ffi.compile() changes into its output folder, so paths must be absolute there
    if __name__ == "__main__":
        return str(p)
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


ffi = FFI()
ffi.cdef(cdef_from_header((HERE / "ring.h").read_text()))
ffi.set_source(
    "pipeline._ring",
    '#include "ring.h"\n',
    sources=[_rel(HERE / "ring.c")],
    include_dirs=[_rel(HERE)],
    libraries=["bpf"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    depends=[_rel(HERE / "ring.h")],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".", verbose=True)
