"""Finding the authors' files: their (method, model) pairs in a folder laid out as their
Hub dataset, or fetched from the Hub with only the patterns an import needs; their
folder names as our `method` and concept levels; the importer's error."""

from __future__ import annotations

import fnmatch
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core import contract
from ..publish.layout import PublishError

_RESULT_TAR = re.compile(r"result__(?P<method>[^/]+?)__(?P<model>[^/]+)\.tar\.zst")
_JUDGMENTS = re.compile(r"judgments__(?P<method>[^/]+?)__(?P<model>[^/]+)__L(?P<layer>\d+)\.json")


class AuthorsImportError(PublishError):
    """The authors' files cannot be imported; the message names the file and field."""


@dataclass
class Pair:
    """One (their method folder, their model folder): where its results and caches are."""

    method_dir: str
    model: str
    tree: Path | None = None  # result/{method}/{model}
    tarball: Path | None = None  # result__{method}__{model}.tar.zst
    judgments: dict[int, Path] = field(default_factory=dict)  # layer -> cache file

    @property
    def method(self) -> str:
        return method_name(self.method_dir)


@dataclass
class Located:
    """The authors' files found in a folder or fetched from the Hub."""

    root: Path
    pairs: dict[tuple[str, str], Pair]
    concepts: Path | None
    alpaca: Path | None
    readme: Path | None
    hub: dict[str, Any] | None = None
    #: a temp folder of links made for a Hub import, removed after it
    view: Path | None = None


def method_name(method_dir: str) -> str:
    """Their method folder as our `method`: `diffmean`, or `probe` for `probe*` (their
    LinearProbe runs live in `probe_l2-0.01`, the l2 weight in the name)."""
    if method_dir == "diffmean":
        return "diffmean"
    if method_dir.startswith("probe"):
        return "probe"
    raise AuthorsImportError(f"result/{method_dir}: unknown method folder (expected "
                             "`diffmean` or `probe...`)")


def concept_level(cid: int, where: str) -> str:
    level = contract.authors_concept_level(cid)
    if level is not None:
        return level
    raise AuthorsImportError(f"{where}: concept_id {cid} is outside the authors' level "
                             "ranges (0-149)")


def _wanted(pair: tuple[str, str], methods: list[str] | None, models: list[str] | None) -> bool:
    """A pair passes `--method` when either their folder name or ours is listed."""
    mdir, model = pair
    if methods and mdir not in methods and method_name(mdir) not in methods:
        return False
    return not models or model in models


def locate_folder(folder: str | Path, methods: list[str] | None = None,
                  models: list[str] | None = None) -> Located:
    """The authors' files in a local folder laid out as their `data/` (or the Hub repo):
    `result/{method}/{model}/` trees and/or `result__*.tar.zst`, `cache/judgments__*`
    (or at the top), `concepts.json`, `alpaca_eval.json`, `README.md`."""
    root = Path(folder)
    pairs: dict[tuple[str, str], Pair] = {}
    res = root / "result"
    if res.is_dir():
        for mdir in sorted(p for p in res.iterdir() if p.is_dir()):
            for model in sorted(p for p in mdir.iterdir() if p.is_dir()):
                key = (mdir.name, model.name)
                pairs.setdefault(key, Pair(*key)).tree = model
    for tar in sorted(root.glob("result__*.tar.zst")):
        m = _RESULT_TAR.fullmatch(tar.name)
        if m is None:
            raise AuthorsImportError(f"{tar}: expected result__{{method}}__{{model}}.tar.zst")
        key = (m["method"], m["model"])
        pairs.setdefault(key, Pair(*key)).tarball = tar
    for cache in sorted([*root.glob("cache/judgments__*.json"), *root.glob("judgments__*.json")]):
        m = _JUDGMENTS.fullmatch(cache.name)
        if m is None:
            raise AuthorsImportError(
                f"{cache}: expected judgments__{{method}}__{{model}}__L{{layer}}.json")
        key = (m["method"], m["model"])
        pairs.setdefault(key, Pair(*key)).judgments[int(m["layer"])] = cache
    pairs = {k: v for k, v in pairs.items() if _wanted(k, methods, models)}
    for p in pairs.values():
        method_name(p.method_dir)  # an unknown method folder is an error, early
    with_results = {k: v for k, v in pairs.items() if v.tree or v.tarball}
    if not with_results:
        which = f" for method {methods} / model {models}" if methods or models else ""
        raise AuthorsImportError(
            f"{root}: no result files{which} (expected result/{{method}}/{{model}}/ or "
            "result__{method}__{model}.tar.zst)")

    def opt(name: str) -> Path | None:
        p = root / name
        return p if p.is_file() else None

    return Located(root, pairs, opt("concepts.json"), opt("alpaca_eval.json"), opt("README.md"))


def hub_patterns(methods: list[str] | None, models: list[str] | None) -> list[str]:
    """What to download: the pairs' tarballs and judgment caches only (never the feature
    caches, banks or other pairs of the ~9 GB repo). `--method probe` matches their
    `probe_l2-0.01` by pattern."""
    ms = [("probe*" if m == "probe" else m) for m in (methods or ["*"])]
    mods = models or ["*"]
    out = []
    for m in ms:
        for model in mods:
            out += [f"result__{m}__{model}.tar.zst", f"cache/judgments__{m}__{model}__L*.json"]
    return out


def locate_hub(repo: str, revision: str | None = None, methods: list[str] | None = None,
               models: list[str] | None = None) -> Located:
    """Fetch only what the import needs through `huggingface_hub` (its cache, offline mode
    and token work as for any Hub file): `concepts.json`, `alpaca_eval.json`, `README.md`
    (for the license), then one `snapshot_download` with `allow_patterns` for the
    selected pairs' tarballs and judgment caches."""
    from huggingface_hub import snapshot_download

    from ...inputs.sources import SourceError, _hub_download, hub_commit

    fetched: list[str] = []
    singles: dict[str, Path | None] = {}
    for name, required in (("concepts.json", True), ("alpaca_eval.json", False),
                           ("README.md", False)):
        try:
            singles[name] = Path(_hub_download(repo, name, revision, "import"))
            fetched.append(name)
        except SourceError:
            if required:
                raise
            singles[name] = None
    patterns = hub_patterns(methods, models)
    try:
        snap = Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                      allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any Hub failure names the repo and patterns
        raise AuthorsImportError(f"hub:{repo}: cannot download {patterns}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    # Offline, snapshot_download returns the cached snapshot folder whole: use only what
    # the patterns select, so a fuller cache does not widen the import.
    picked = sorted(
        p.relative_to(snap).as_posix() for p in snap.rglob("*")
        if p.is_file() and any(fnmatch.fnmatch(p.relative_to(snap).as_posix(), pat)
                               for pat in patterns)
    )
    fetched += picked
    view = _link_view(snap, picked)
    try:
        loc = locate_folder(view, methods, models)
    except BaseException:
        shutil.rmtree(view, ignore_errors=True)
        raise
    loc.root, loc.view = snap, view
    loc.concepts, loc.alpaca, loc.readme = (singles["concepts.json"],
                                            singles["alpaca_eval.json"], singles["README.md"])
    loc.hub = {"repo": repo, "revision": revision or "main",
               "commit": hub_commit(singles["concepts.json"] or snap), "fetched": fetched}
    return loc


def _link_view(snap: Path, rels: list[str]) -> Path:
    """A folder of links to just the picked files, so `locate_folder` sees nothing else
    of a fuller cached snapshot."""
    import tempfile

    view = Path(tempfile.mkdtemp(prefix="asteer-import-"))
    for rel in rels:
        dest = view / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to((snap / rel).resolve())
    return view
