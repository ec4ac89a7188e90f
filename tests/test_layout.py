"""The package layering, checked by walking every import statement (function-level ones
included: a lazy import is still a dependency; `if TYPE_CHECKING:` ones excluded: they
only name types): no import cycle among the project's modules, the engine never imports
the pipeline above it, and `train` loads without vLLM or Ray."""

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
    """ids of import nodes under `if TYPE_CHECKING:`: annotations only, never executed,
    so not a dependency (the sanctioned way to type a seam without importing it)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for child in node.body for n in ast.walk(child)}
    return out


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for name, f in MODS.items():
        tree = ast.parse(f.read_text())
        skip = _type_only(tree)
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
    assert "vllm" in g["asteer_build.rollouts"]
    # annotations only: execute_local types its run without importing build at run time
    assert "asteer_build.build" not in g["asteer_build.execute_local"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_engine_never_imports_the_pipeline():
    up = {m: sorted(d for d in deps if d.startswith("asteer_build")
                    and not d.startswith("asteer_build.engine"))
          for m, deps in _graph().items() if m.startswith("asteer_build.engine")}
    assert {m: d for m, d in up.items() if d} == {}


def test_train_and_judge_load_without_vllm_or_ray():
    heavy = {"vllm", "ray", "torch", "asteer_build.engine"}
    for m, deps in _graph(top_level_only=True).items():
        if m.startswith(("train", "judge")):
            assert not {d for d in deps if d.split(".")[0] in heavy or d in heavy}, m


def test_public_api_keeps_its_import_paths():
    """The names the README gives users import from where it says (issue 14, item 8)."""
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
