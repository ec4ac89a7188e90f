"""Contrast banks from files in the reference authors' layout: one JSON file per concept,
`{"positive": [...], "negative": [...]}` (50 texts each in their data), read from a Hub
dataset (`Fcr09/SteerBoost-data`, `training/{concept_id}.json`) or from a local folder
with the same layout.

The Hub form goes through `huggingface_hub.hf_hub_download`, so it uses (and fills) the
Hugging Face cache and works offline from a pre-populated cache (`HF_HUB_OFFLINE=1`).
Unpinned, the first file resolves the branch to a commit and every other file is read at
that commit, so one build never mixes two versions of the banks; the commit is in each
bank's header (`Bank.header["revision"]`).

The config form is `BankFiles.from_section` (the `vectors.banks` section):

    banks: {hub: Fcr09/SteerBoost-data, pattern: "training/{concept_id}.json",
            revision: null}
    banks: {path: some/dir, pattern: "training/{concept_id}.json"}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.fields import reject_unknown
from ..inputs.sources import Concept, hub_commit
from .banks import Bank, BankError

__all__ = ["DEFAULT_PATTERN", "BankFiles", "read_bank_file", "load_bank_files"]

#: where the authors keep a concept's bank, relative to the dataset's root
DEFAULT_PATTERN = "training/{concept_id}.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class BankFiles:
    """Where the bank files are: a Hub dataset (`hub`, optional `revision`) or a local
    folder (`path`); `pattern` names a concept's file (`{concept_id}` is filled in)."""

    hub: str | None = None
    path: str | None = None
    pattern: str = DEFAULT_PATTERN
    revision: str | None = None

    def __post_init__(self) -> None:
        w = "vectors.banks"
        if (self.hub is None) == (self.path is None):
            raise ValueError(f"{w}: set exactly one of `hub` (a Hub dataset id) or `path` "
                             f"(a local folder) (got hub={self.hub!r}, path={self.path!r})")
        if self.hub is not None and (not isinstance(self.hub, str)
                                     or not _HUB_ID.match(self.hub)):
            raise ValueError(f"{w}.hub: expected a Hub dataset id like owner/name (got "
                             f"{self.hub!r})")
        if self.path is not None:
            if not isinstance(self.path, str | os.PathLike) or not str(self.path).strip():
                raise ValueError(f"{w}.path: expected a folder path (got {self.path!r})")
            object.__setattr__(self, "path", str(self.path))
            if self.revision is not None:
                raise ValueError(f"{w}.revision: only for `hub` banks (got "
                                 f"{self.revision!r} with path {self.path!r})")
        if not isinstance(self.pattern, str) or "{concept_id}" not in self.pattern:
            raise ValueError(f"{w}.pattern: expected a file name containing "
                             f"'{{concept_id}}' (got {self.pattern!r})")
        try:
            self.pattern.format(concept_id="0")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{w}.pattern: only '{{concept_id}}' may be filled in (got "
                             f"{self.pattern!r}: {e})") from None
        if self.revision is not None and (not isinstance(self.revision, str)
                                          or not self.revision.strip()):
            raise ValueError(f"{w}.revision: expected a branch, tag or commit (got "
                             f"{self.revision!r})")

    @classmethod
    def from_section(cls, section: Any) -> BankFiles:
        if isinstance(section, BankFiles):
            return section
        if not isinstance(section, Mapping):
            raise ValueError(f"vectors.banks: expected a mapping like {{hub: OWNER/NAME}} or "
                             f"{{path: FOLDER}} (got {section!r})")
        reject_unknown(section, "vectors.banks", ("hub", "path", "pattern", "revision"))
        return cls(**{k: v for k, v in section.items() if v is not None or k != "pattern"})

    def as_dict(self) -> dict[str, Any]:
        return {"hub": self.hub, "path": self.path, "pattern": self.pattern,
                "revision": self.revision}

    def where(self) -> str:
        return (f"Hub dataset {self.hub}@{self.revision or 'main'}" if self.hub
                else f"folder {self.path}")


def read_bank_file(path: str | Path, concept_id: str) -> Bank:
    """One authors-format bank file; errors name the concept, the file, the key and the
    index of a bad text."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BankError(f"{concept_id}: bank file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BankError(f"{concept_id}: bank file {p}: expected an object with `positive` "
                        f"and `negative` lists (got {type(data).__name__})")
    sides: dict[str, list[str]] = {}
    for key in ("positive", "negative"):
        if key not in data:
            raise BankError(f"{concept_id}: bank file {p} has no `{key}` key (keys: "
                            f"{sorted(data)})")
        texts = data[key]
        if not isinstance(texts, list) or not texts:
            raise BankError(f"{concept_id}: bank file {p}: `{key}` must be a non-empty list "
                            f"of texts (got {texts!r:.80})")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise BankError(f"{concept_id}: bank file {p}: `{key}`[{i}] must be a "
                                f"non-empty string (got {t!r:.80})")
        sides[key] = texts
    return Bank(concept_id, sides["positive"], sides["negative"], {"file": str(p)})


def _hub_file(spec: BankFiles, filename: str, revision: str | None, concept_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(spec.hub, filename, repo_type="dataset",
                                    revision=revision))
    except EntryNotFoundError as e:
        where = (" in the local Hugging Face cache (offline, or the Hub unreachable)"
                 if isinstance(e, LocalEntryNotFoundError) else "")
        raise BankError(f"{concept_id}: no bank file {filename} in Hub dataset {spec.hub}@"
                        f"{revision or 'main'}{where}") from e


def load_bank_files(concepts: Sequence[Concept], spec: BankFiles | Mapping[str, Any]
                    ) -> dict[str, Bank]:
    """Each concept's bank from `spec`, in concept order. The authors' concept ids are the
    integers 0..149; ours are their strings, so `training/{concept_id}.json` names
    `training/7.json` for concept "7"."""
    spec = BankFiles.from_section(spec)
    out: dict[str, Bank] = {}
    revision = spec.revision
    for c in concepts:
        filename = spec.pattern.format(concept_id=c.concept_id)
        if spec.hub:
            local = _hub_file(spec, filename, revision, c.concept_id)
            commit = hub_commit(local)
            commit = commit if commit and _COMMIT.match(commit) else None
            if revision is None or not _COMMIT.match(revision):
                revision = commit or revision  # pin: every later file from this commit
            bank = read_bank_file(local, c.concept_id)
            bank.header = {"source": "hub", "repo": spec.hub, "file": filename,
                           "revision": commit}
        else:
            local = Path(spec.path or ".") / filename
            if not local.is_file():
                raise BankError(f"{c.concept_id}: no bank file {filename} in folder "
                                f"{spec.path} (looked for {local})")
            bank = read_bank_file(local, c.concept_id)
            bank.header = {"source": "path", "file": str(local)}
        out[c.concept_id] = bank
    return out
