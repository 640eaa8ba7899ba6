"""One translation unit for bcc from a BPF program and its local headers.

bcc's rewriter (``map.lookup(&k)`` -> ``bpf_map_lookup_elem``, map fds) only rewrites the main
file, so a map used from an ``#include "x.h"`` header is left as a call through a null
pointer and the verifier rejects it. The C stays in bpf/*.c and bpf/*.h: this inlines each
quoted ``#include`` of a file next to the program (once; the headers have guards as well) and
marks every piece with ``#line`` so compiler and verifier messages name the real file and line.
System headers (``#include <...>``) are left to bcc.
"""
from __future__ import annotations

import re
from pathlib import Path

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


class SourceError(ValueError):
    """A local include that cannot be resolved (named with the including file and line)."""


def amalgamate(path: str | Path) -> str:
    """The program at ``path`` with its quoted includes inlined, as one C text."""
    main = Path(path).resolve()
    seen: set[Path] = set()
    out: list[str] = []

    def emit(file: Path) -> None:
        seen.add(file)
        out.append(f'#line 1 "{file}"')
        for n, line in enumerate(file.read_text().splitlines(), 1):
            m = _LOCAL_INCLUDE.match(line)
            if m is None:
                out.append(line)
                continue
            inc = (file.parent / m.group(1)).resolve()
            if not inc.is_file():
                raise SourceError(f"{file}:{n}: #include \"{m.group(1)}\": no such file "
                                  f"next to {file.name}")
            if inc not in seen:
                emit(inc)
            out.append(f'#line {n + 1} "{file}"')

    emit(main)
    return "\n".join(out) + "\n"
