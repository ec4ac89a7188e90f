"""Config model paths that name a tiny model (`tinyworld[:ARCH][:seed=N]`) and their
folders: the one place the builder and the sampling resolver turn such names into
folders, and tell a tiny model from a real one."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .models import ARCHS, TinyWorldSpec, build_arch_model, build_tiny_model


def parse_tiny_name(name: str) -> tuple[str | None, int] | None:
    """(arch or None for the default tiny Llama, seed) of a config model path naming a
    tiny model: `tinyworld`, `tinyworld:seed=N`, `tinyworld:ARCH` or
    `tinyworld:ARCH:seed=N` (ARCH one of ARCHS); None for any other path. Lets one config
    hold several distinct tiny models (the transfer benchmark's dataset) without
    writing their cache folders into it. A malformed `tinyworld:` name is an error."""
    if name == "tinyworld":
        return None, 0
    if not name.startswith("tinyworld:"):
        return None
    arch, seed = None, 0
    parts = name.split(":")[1:]
    for i, part in enumerate(parts):
        if part in ARCHS and i == 0:
            arch = part
        elif re.fullmatch(r"seed=\d+", part) and i == len(parts) - 1:
            seed = int(part.split("=", 1)[1])
        else:
            raise ValueError(
                f"tinyworld: {name!r}: expected tinyworld[:ARCH][:seed=N] with ARCH one "
                f"of {', '.join(ARCHS)}; bad part {part!r}"
            )
    return arch, seed


def resolve_tiny_name(name: str) -> Path:
    """The folder of the tiny model a `tinyworld[:ARCH][:seed=N]` name denotes (written
    on first use, cached)."""
    parsed = parse_tiny_name(name)
    if parsed is None:
        raise ValueError(f"tinyworld: {name!r} is not a tiny-model name")
    arch, seed = parsed
    if arch is not None:
        return build_arch_model(arch, seed)
    return build_tiny_model(TinyWorldSpec(seed=seed))


def resolve_model_path(path: str) -> str:
    """A config's model path as something vLLM / transformers load: a tiny-world name
    becomes its folder (written on first use); any other path is returned as it is. The
    one place the builder and the sampling resolver turn names into folders."""
    return path if parse_tiny_name(path) is None else str(resolve_tiny_name(path))


def is_tiny_model(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is the tiny world: the config's `tinyworld`, or a folder written by
    `build_tiny_model` (it carries `asteer_tinyworld.json`). Sources that only make sense
    for the tiny world (the template contrast banks) check this."""
    if str(path) == "tinyworld" or str(path).startswith("tinyworld:"):
        return True
    p = Path(path)
    return p.is_dir() and (p / "asteer_tinyworld.json").is_file()

