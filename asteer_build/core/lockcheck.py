"""Is this process running the locked environment?

A Ray job runs on nodes that were provisioned earlier (cluster YAML, an image, a
hand-made venv). A node whose vLLM, torch or Ray drifted from the lock fails late and
obscurely (a vLLM internal moved, a Ray wire format changed), or worse, builds rows with
different numerics. So the runtime env names the lock the job expects
(`ASTEER_REQUIRE_LOCK: requirements/gpu.txt`, a path inside the job's working dir) and
the driver and every engine actor compare their installed versions against it before
touching a GPU; a mismatch stops them with the list of differences.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

ENV_VAR = "ASTEER_REQUIRE_LOCK"
_PIN = re.compile(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?")


class LockMismatch(RuntimeError):
    pass


def read_lock(path: str | Path) -> dict[str, str]:
    """Exact pins of a `uv pip compile` lock, by canonical name; anything that is not an
    exact pin is an error, since then the file is not a lock."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.fullmatch(line)
        if not m:
            raise LockMismatch(f"{path}:{n}: not an exact pin: {line!r}")
        pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def mismatches(path: str | Path) -> dict[str, tuple[str, str | None]]:
    """name -> (locked, installed or None) for every pin this environment differs from."""
    out: dict[str, tuple[str, str | None]] = {}
    for name, want in read_lock(path).items():
        try:
            have: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != want:
            out[name] = (want, have)
    return out


def require_lock(where: str) -> None:
    """Raise `LockMismatch` when `ASTEER_REQUIRE_LOCK` names a lock this process differs
    from; nothing when the variable is unset (a user's own environment)."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    if not Path(path).is_file():
        raise LockMismatch(f"{where}: {ENV_VAR}={path!r} is not a file here "
                           f"(cwd {os.getcwd()}); it is read relative to the job's working dir")
    diff = mismatches(path)
    if diff:
        shown = ", ".join(f"{n} {have or 'missing'} (lock {want})"
                          for n, (want, have) in sorted(diff.items())[:12])
        more = f" and {len(diff) - 12} more" if len(diff) > 12 else ""
        raise LockMismatch(
            f"{where}: this environment differs from {path}: {shown}{more}. Install the "
            f"node from the lock (`pip install --no-deps -r {path}`; cluster/README.md)")
