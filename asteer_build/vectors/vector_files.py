"""The `file` method: vectors the researcher brings (SAE decoder directions, a trained
vector, another tool's PCA), from one safetensors file, local or in a Hub repo.

The file holds one 1-D float tensor per concept and layer, under the key
`<concept_id>/<layer>` (`tw-ocean/2`), so one file can serve builds at several layers.
Every configured concept must have a vector at the configured layer; each must be finite
and not all zeros, and (where the model's width is known) as wide as the residual stream.
Anything else is refused naming the concept, the layer and the key, before an engine
starts. The vectors are used as they are (not normalized), like DiffMean's; the index
records where they came from (the source and the file's sha256).

    vectors:
      file: {path: my_vectors.safetensors}     # relative to the config file
      # or {hub: org/repo, filename: vectors.safetensors, repo_type: model, revision: v1}
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.fields import reject_unknown

__all__ = ["VectorFile", "VectorFileError", "file_key", "read_vector_file"]


class VectorFileError(ValueError):
    """A vector file that does not cover the build, or holds a bad vector."""


def file_key(concept_id: str, layer: int) -> str:
    return f"{concept_id}/{int(layer)}"


@dataclass(frozen=True)
class VectorFile:
    """Where the `file` method's vectors are: a local `path`, or `filename` in the Hub
    repo `hub` (credentials from the environment, as `huggingface_hub` reads them)."""

    path: str | None = None
    hub: str | None = None
    filename: str = "vectors.safetensors"
    repo_type: str = "model"
    revision: str | None = None

    @classmethod
    def from_section(cls, d: Any) -> VectorFile:
        if isinstance(d, VectorFile):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"vectors.file: expected {{path: FILE}} or {{hub: REPO, "
                             f"filename: NAME}} (got {d!r})")
        reject_unknown(d, "vectors.file", ("path", "hub", "filename", "repo_type", "revision"))
        for k, v in d.items():
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"vectors.file.{k}: expected a non-empty string (got {v!r})")
        vf = cls(**d)
        if (vf.path is None) == (vf.hub is None):
            raise ValueError(f"vectors.file: set exactly one of path and hub (got {dict(d)!r})")
        if vf.repo_type not in ("model", "dataset"):
            raise ValueError(f"vectors.file.repo_type: expected model or dataset (got "
                             f"{vf.repo_type!r})")
        return vf

    def where(self) -> str:
        if self.path is not None:
            return self.path
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{'datasets/' if self.repo_type == 'dataset' else ''}{self.hub}{rev}/" \
               f"{self.filename}"

    def local_path(self) -> Path:
        if self.path is not None:
            p = Path(os.path.expanduser(self.path))
            if not p.is_file():
                raise VectorFileError(f"vectors.file.path: no such file {self.path!r}")
            return p
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.hub, self.filename, repo_type=self.repo_type,
                                        revision=self.revision))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise VectorFileError(f"vectors.file: cannot fetch {self.where()}: "
                                  f"{type(e).__name__}: {e}") from e


def read_vector_file(vf: VectorFile, concept_ids: Sequence[str], layer: int,
                     hidden: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """({concept_id: float32 tensor}, provenance) for the configured concepts at `layer`."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = vf.local_path()
    data = path.read_bytes()
    try:
        tensors = load(data)
    except SafetensorError as e:
        raise VectorFileError(f"vectors.file: {vf.where()} is not a safetensors file "
                              f"({e})") from e
    out: dict[str, torch.Tensor] = {}
    for cid in concept_ids:
        key = file_key(cid, layer)
        t = tensors.get(key)
        if t is None:
            layers = sorted(int(k.rsplit("/", 1)[1]) for k in tensors
                            if k.rsplit("/", 1)[0] == cid and k.rsplit("/", 1)[1].isdigit())
            has = f"it has layers {layers} for it" if layers else "it has none for it"
            raise VectorFileError(f"vectors.file: {vf.where()}: no vector for concept {cid!r} "
                                  f"at layer {layer} (key {key!r}; {has})")
        bad = None
        if t.ndim != 1:
            bad = f"shape {tuple(t.shape)}, expected one vector [hidden]"
        elif not t.is_floating_point():
            bad = f"dtype {t.dtype}, expected a float tensor"
        elif hidden is not None and t.shape[0] != hidden:
            bad = f"{t.shape[0]} values, the model's residual stream has {hidden}"
        elif not bool(torch.isfinite(t).all()):
            bad = "NaN or inf values"
        elif not bool(t.any()):
            bad = "all zeros"
        if bad:
            raise VectorFileError(f"vectors.file: {vf.where()}: concept {cid!r} at layer "
                                  f"{layer} (key {key!r}): {bad}")
        out[cid] = t.to(torch.float32).contiguous()
    return out, {"source": vf.where(), "sha256": hashlib.sha256(data).hexdigest()}
