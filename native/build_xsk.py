"""cffi (API mode) build script for the AF_XDP worker ``pipeline._xsk`` (native/xsk.h, xsk.c).

setup.py lists every native/build_*.py, so ``make setup`` builds it, linked against the system
libxdp (the xsk API) and libbpf (XSKMAP update). The cdef is native/xsk.h itself minus the
preprocessor lines (integer ``#define``s are kept). The module does not link the ESP code: the
worker calls the ESP batch functions of ``pipeline._esp`` through pointers (see xsk.h).

Run directly (``python native/build_xsk.py OUTDIR``) to build a copy into OUTDIR.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # cffi runs this file by path
from cffi_common import module

ffi = module("_xsk", "xsk.h", ["xsk.c"], libraries=["xdp", "bpf"], depends=["xsk.h", "esp.h"],
             as_script=__name__ == "__main__")

if __name__ == "__main__":
    ffi.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".", verbose=True)
