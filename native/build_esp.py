"""cffi (API mode) build script for the native ESP module ``pipeline._esp``.

setup.py lists every native/build_*.py, so ``pip install -e .`` (``make setup``) builds it and
links the system libcrypto (Debian's libssl-dev). The cdef is native/esp.h itself, minus the
preprocessor lines and the block guarded by ``#if !defined(XT_ESP_CDEF)`` (C-only parts).

Environment knobs (used by ``make sanitize``, never by the normal install):
  XT_ESP_SANITIZE=1   build with -fsanitize=address,undefined (load libasan with LD_PRELOAD).
Run directly (``python native/build_esp.py OUTDIR``) to build a copy into OUTDIR.
"""
import os
import re
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["esp.c", "esp_data.c", "esp_replay.c", "esp_bench.c"]


def cdef_from_header(text: str) -> str:
    """The header as cffi sees it: no C-only block, no preprocessor lines except int #defines."""
    text = re.sub(r"#if !defined\(XT_ESP_CDEF\).*?#endif /\* XT_ESP_C_ONLY end \*/", "", text,
                  flags=re.DOTALL)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = re.match(r"#define\s+(XT_\w+)\s+(-?\d+)\b", s)
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


CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
LDFLAGS: list[str] = []
if os.environ.get("XT_ESP_SANITIZE") == "1":
    CFLAGS = ["-O1", "-g", "-std=gnu11", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    LDFLAGS = ["-fsanitize=address,undefined"]

ffi = FFI()
ffi.cdef(cdef_from_header((HERE / "esp.h").read_text()))
ffi.set_source(
    "pipeline._esp",
    '#include "esp.h"\n',
    sources=[_rel(HERE / s) for s in SOURCES],
    include_dirs=[_rel(HERE)],
    libraries=["crypto"],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
    depends=[_rel(HERE / h) for h in ("esp.h", "esp_internal.h", "esp_replay.h")],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".", verbose=True)
