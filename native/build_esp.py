"""cffi (API mode) build script for the native ESP module ``pipeline._esp``.

setup.py lists every native/build_*.py, so ``pip install -e .`` (``make setup``) builds it and
links the system libcrypto (Debian's libssl-dev). The cdef is native/esp.h itself, minus the
preprocessor lines and the block guarded by ``#if !defined(XT_ESP_CDEF)`` (C-only parts).

Environment knobs (used by ``make sanitize``, never by the normal install):
  XT_ESP_SANITIZE=1   build with -fsanitize=address,undefined (load libasan with LD_PRELOAD).
Run directly (``python native/build_esp.py OUTDIR``) to build a copy into OUTDIR.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # cffi runs this file by path
from cffi_common import module

SOURCES = ["esp.c", "esp_data.c", "esp_replay.c", "esp_bench.c"]
C_ONLY = r"#if !defined\(XT_ESP_CDEF\).*?#endif /\* XT_ESP_C_ONLY end \*/"

CFLAGS = None
LDFLAGS = None
if os.environ.get("XT_ESP_SANITIZE") == "1":
    CFLAGS = ["-O1", "-g", "-std=gnu11", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    LDFLAGS = ["-fsanitize=address,undefined"]

ffi = module("_esp", "esp.h", SOURCES, libraries=["crypto"],
             depends=["esp.h", "esp_internal.h", "esp_replay.h"], c_only=C_ONLY,
             cflags=CFLAGS, ldflags=LDFLAGS, as_script=__name__ == "__main__")

if __name__ == "__main__":
    ffi.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".", verbose=True)
