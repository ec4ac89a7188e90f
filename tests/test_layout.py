"""The package layering, checked by walking every import statement (function-level ones
included: a lazy import is still a dependency; so are imports under `TYPE_CHECKING`: a
seam typed through an upward import is still a circle): the layer map, no import circle,
no module over the size limit, and `train` and `judge` load without vLLM or Ray."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("asteer_build", "judge", "train")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


MODS = _modules()


def _targets(cur: str, node: ast.Import | ast.ImportFrom, top_level_only: bool = False):
    """Imported names, resolved to the project module that provides them (or to the
    external top-level package name)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = cur.split(".")
            if MODS[cur].name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        # `from pkg import sub` depends on pkg.sub only (a submodule, not the package)
        names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODS else mod for a in node.names]
    out = set()
    for n in names:
        m = n
        while m and m not in MODS:
            m = m.rpartition(".")[0]
        out.add(m or n.split(".")[0])
    out.discard(cur)
    return out


def _type_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (only for the one check that asks
    for run-time imports: what `train` and `judge` load)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for child in node.body for n in ast.walk(child)}
    return out


def _graph(top_level_only: bool = False, runtime_only: bool = False) -> dict[str, set[str]]:
    """Every import edge; imports under `TYPE_CHECKING` count unless `runtime_only`: a
    seam typed through an upward import is still a circle in the design."""
    g: dict[str, set[str]] = {}
    for name, f in MODS.items():
        tree = ast.parse(f.read_text())
        skip = _type_only(tree) if runtime_only else set()
        nodes = [n for n in (tree.body if top_level_only else ast.walk(tree))
                 if id(n) not in skip]
        deps: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                deps |= _targets(name, node)
        g[name] = deps
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v] & g.keys()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_real_edges():
    g = _graph()
    assert "asteer_build.engine.features" in g["asteer_build.engine.collect"]
    assert "asteer_build.rollouts" in g["train.suggest"]  # a lazy import counts
    assert "vllm" in g["asteer_build.pipeline.records"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    # an import under TYPE_CHECKING is an edge too
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n")
    assert len(_type_only(tree)) == 2


def test_no_import_cycle():
    assert _cycles(_graph()) == []


#: asteer_build's layers, bottom up: a module imports from its own layer or below. The
#: folders are the layers; the entry points and the README's public shims sit on top.
LAYERS = {
    "asteer_build.core": 0,       # the contract, atomic writes, prompt rendering, console
    "asteer_build.inputs": 1,     # concept and prompt sources, the tiny world
    "asteer_build.engine": 2,     # vLLM glue and the HF reference
    "asteer_build.vectors": 3,    # contrast banks, pooling, vector methods
    "asteer_build.pipeline": 4,   # config, plan, work, feed, shards, executors, build
    "asteer_build.io": 5,         # publish, the authors' importer
    "asteer_build": 6,            # cli, demo, and the shims rollouts / capture
}
MAX_LINES = 500


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if parts[0] != "asteer_build" or "asteer_build.configs" in mod:
        return None
    return LAYERS.get(".".join(parts[:2]), LAYERS["asteer_build"])


def test_every_import_goes_down_the_layer_map():
    g = _graph()
    up = sorted(f"{m} (layer {_layer(m)}) -> {d} (layer {_layer(d)})"
                for m, deps in g.items() if _layer(m) is not None
                for d in deps if _layer(d) is not None and _layer(d) > _layer(m))
    assert up == []
    top = {m for m in MODS if m.count(".") == 1 and m.startswith("asteer_build.")
           and m.split(".")[1] not in {k.split(".")[1] for k in LAYERS if "." in k}}
    assert top == {"asteer_build.cli", "asteer_build.demo", "asteer_build.rollouts",
                   "asteer_build.capture", "asteer_build.configs"}


def test_no_module_over_the_size_limit():
    big = {m: n for m, f in MODS.items()
           if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_train_and_judge_load_without_vllm_or_ray():
    heavy = {"vllm", "ray", "torch", "asteer_build.engine"}
    for m, deps in _graph(top_level_only=True, runtime_only=True).items():
        if m.startswith(("train", "judge")):
            assert not {d for d in deps if d.split(".")[0] in heavy or d in heavy}, m


def test_public_api_keeps_its_import_paths():
    """The names the README gives users import from where it says ."""
    from asteer_build.capture import CaptureSettings as Old
    from asteer_build.cli import main as build_main
    from asteer_build.engine import AsyncSteeredEngine, SteeredEngine, SteerSpec
    from asteer_build.rollouts import CaptureSettings, RolloutResult, run_rollouts
    from judge.cli import main as judge_main
    from train.cli import main as train_main

    assert Old is CaptureSettings
    assert SteeredEngine.__module__ == AsyncSteeredEngine.__module__ == "asteer_build.engine.llm"
    assert SteerSpec("v", 1.0, 2).positions == "all"
    assert all(callable(f) for f in (run_rollouts, build_main, judge_main, train_main))
    assert "features" in RolloutResult.__dataclass_fields__
