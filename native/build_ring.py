"""cffi (API mode) build script for the BPF ring buffer batch consumer ``pipeline._ring``
(native/ring.h, ring.c), used by the analytics sampler (pipeline/analytics/samples.py).

setup.py lists every native/build_*.py, so ``make setup`` builds it, linked against the system
libbpf (only for the map info call; the ring itself is read through mmap). The cdef is
native/ring.h itself minus the preprocessor lines (integer ``XT_`` #defines are kept).

Run directly (``python native/build_ring.py OUTDIR``) to build a copy into OUTDIR.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # cffi runs this file by path
from cffi_common import module

ffi = module("_ring", "ring.h", ["ring.c"], libraries=["bpf"], depends=["ring.h"],
             as_script=__name__ == "__main__")

if __name__ == "__main__":
    ffi.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".", verbose=True)
