"""Work units for `pytest -n N --dist loadscope` (what `make test` runs).

A session resource that costs a start (the Ray head, the `vllm serve` judge, the engine
registry) must start once per run, not once per worker. So the modules that use the same
one form one work unit, and xdist hands each unit to one worker as a whole. Units go out
longest first (the Ray unit, then the engines, then the judge server, then by how many
slow tests they hold), so the workers finish together.

Only the workers collect tests, so they work out the units (from the fixtures each test
uses) and write them to a file the controller's scheduler reads when it splits the work.
(xdist's own `--dist loadgroup` would need no file, but it renames node ids through an
attribute pytest 9.2 no longer reads, so its groups are silently ignored.)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

#: the session resources that define units, the unit holding the first one going out
#: first; a resource not here (the reference build: ~15 s) may start on each worker
SHARED_FIXTURES = ("ray_head", "engines", "judge_server")
UNITS_KEY = "asteer_units_file"


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def work_units(items: list[pytest.Item]) -> dict[str, str]:
    """Module path -> its unit: the module alone, or the modules joined through a shared
    session resource (union-find over the fixtures each test uses)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for item in items:
        mod = find(_module(item.nodeid))
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                parent[find(f"fixture:{name}")] = mod
    members: dict[str, list[str]] = {}
    for x in parent:
        if not x.startswith("fixture:"):
            members.setdefault(find(x), []).append(x)
    return {m: "+".join(sorted(ms)) for ms in members.values() for m in ms}


def order_by_unit(items: list[pytest.Item], unit_of: dict[str, str]) -> None:
    """Units in the order they should go out, each unit's tests in their own order."""
    stats: dict[str, list[int]] = {}  # unit -> [first resource it uses, -slow tests, index]
    for i, item in enumerate(items):
        names = getattr(item, "fixturenames", ())
        s = stats.setdefault(unit_of[_module(item.nodeid)], [len(SHARED_FIXTURES), 0, i])
        s[0] = min([s[0]] + [SHARED_FIXTURES.index(f) for f in SHARED_FIXTURES if f in names])
        s[1] -= item.get_closest_marker("slow") is not None
    items.sort(key=lambda it: stats[unit_of[_module(it.nodeid)]])


def worker_collected(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: order the items by unit and write the units for the
    controller (every worker writes the same map; the last rename wins)."""
    path = getattr(config, "workerinput", {}).get(UNITS_KEY)
    if not path:
        return
    unit_of = work_units(items)
    order_by_unit(items, unit_of)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".units-")
    with os.fdopen(fd, "w") as f:
        json.dump(unit_of, f)
    os.replace(tmp, path)


def make_scheduler(config: pytest.Config, log):
    """The controller's scheduler under `--dist loadscope`: xdist's, with units for scopes
    and the workers' order kept (not re-sorted by test count)."""
    if getattr(config.option, "dist", "no") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        _units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._units is None:
                self._units = json.loads(Path(config._asteer_units).read_text())
            return self._units.get(_module(nodeid), _module(nodeid))

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)


def configure_controller(config: pytest.Config) -> None:
    if getattr(config.option, "dist", "no") == "loadscope" and not hasattr(config, "workerinput"):
        folder = tempfile.mkdtemp(prefix="asteer-xdist-")
        atexit.register(shutil.rmtree, folder, True)
        config._asteer_units = os.path.join(folder, "units.json")


def configure_node(node) -> None:
    path = getattr(node.config, "_asteer_units", None)
    if path:
        node.workerinput[UNITS_KEY] = path
