"""Put first on PYTHONPATH (with RSFT_IMPORT_LOG set) to record what every Python process imports:
each successful `import` statement as "importer imported" (top-level names; the importer is the
module whose code ran the statement, `__main__` given as its file). Written at exit to
$RSFT_IMPORT_LOG/<pid>.txt, the command line first. Failed imports (optional dependencies that
are absent) are not recorded. Used by tests/test_gpu_check.py."""

import atexit
import builtins
import os
import sys

_edges: set[tuple[str, str]] = set()
_import = builtins.__import__


def _importer(globals_) -> str:
    name = (globals_ or {}).get("__name__") or "?"
    if name in ("__main__", "__mp_main__"):
        return "__main__:" + str((globals_ or {}).get("__file__"))
    return name.split(".")[0]


def _recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = _import(name, globals, locals, fromlist, level)
    if level == 0:
        _edges.add((_importer(globals), name.split(".")[0]))
    return module


def _write() -> None:
    with open(os.path.join(os.environ["RSFT_IMPORT_LOG"], f"{os.getpid()}.txt"), "w") as f:
        f.write(" ".join(sys.argv) + "\n")
        f.writelines(f"{a} {b}\n" for a, b in sorted(_edges) if a != b)


if os.environ.get("RSFT_IMPORT_LOG"):
    builtins.__import__ = _recording_import
    atexit.register(_write)
