"""Data-file boundaries: which planned shards make up each published data file.

A data file is a fixed range of the run's *planned* shard indices (`shard-000012` is
index 12 of `build.json["shards"]`), and how many shards a range holds is set from the
build config (rows per shard, response length) or the stage's schema, never from the
bytes the shards turned out to have. So the boundaries are known before any shard exists,
a file's contents are final as soon as every shard of its range is committed, and
following a run as it builds (`follow`) and publishing it once finished write the same
files, byte for byte. Sizes are estimates: files land near `target_file_bytes`, not on it.

A shard whose estimate alone outgrows the target (activations at paper scale) is cut into
`parts` equal row ranges, one file each, numbered `index * parts + part`. Files are
numbered by span, so a folder that holds one model's shards only (`activations/<model>/`
of a run with several models) may skip numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ...pipeline.plan import shard_name
from ...pipeline.shards import Manifest

_INDEX = re.compile(r"shard-(\d+)$")
#: rows per shard when the manifest says nothing better (the builder's default shard_size)
_DEFAULT_ROWS = 256
#: a rollouts row besides its response: ids, names, numbers, a judge explanation
_ROLLOUT_FIXED_BYTES = 256
#: compressed bytes per response token (text), and tokens when the config gives none
_BYTES_PER_TOKEN = 2
_DEFAULT_TOKENS = 256


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one committed input shard file."""

    shard: str
    path: str
    sha256: str
    start: int
    stop: int


@dataclass(frozen=True)
class FileRule:
    """`per_file` consecutive planned shards per file, or (`parts` > 1) each shard cut into
    `parts` files."""

    per_file: int
    parts: int = 1


def file_rule(shard_bytes: float, target: int) -> FileRule:
    shard_bytes = max(shard_bytes, 1.0)
    if shard_bytes > target:
        return FileRule(1, math.ceil(shard_bytes / target))
    return FileRule(max(1, int(target // shard_bytes)))


def planned_shards(manifest: Manifest, names: list[str]) -> int:
    """The run's planned shard count; a manifest without one (not the builder's) counts
    the shards it names."""
    n = manifest.data.get("shards")
    if isinstance(n, int) and n > 0:
        return n
    return max((shard_index(x, i) for i, x in enumerate(names)), default=-1) + 1


def shard_rows(manifest: Manifest) -> int:
    d = manifest.data
    size = (d.get("config") or {}).get("shard_size")
    if isinstance(size, int) and size > 0:
        return size
    items, shards = d.get("items"), d.get("shards")
    if isinstance(items, int) and isinstance(shards, int) and shards > 0:
        return max(1, math.ceil(items / shards))
    return _DEFAULT_ROWS


def rollout_row_bytes(manifest: Manifest) -> int:
    """Responses dominate a rollouts row; their length comes from the sampling config."""
    s = (manifest.data.get("config") or {}).get("sampling") or {}
    tokens = s.get("expected_response_tokens") or s.get("max_tokens") or _DEFAULT_TOKENS
    return _ROLLOUT_FIXED_BYTES + _BYTES_PER_TOKEN * int(tokens)


def _type_bytes(t: pa.DataType) -> int:
    n = 1
    while pa.types.is_fixed_size_list(t):
        n *= t.list_size
        t = t.value_type
    try:
        return n * max(1, t.bit_width // 8)
    except ValueError:  # strings and other variable-width columns
        return n * 32


def schema_row_bytes(schema: pa.Schema) -> int:
    """Fixed-width numbers (features, activations) barely compress: their width is the
    estimate."""
    return sum(_type_bytes(f.type) for f in schema)


def shard_index(name: str, position: int) -> int:
    m = _INDEX.search(name)
    return int(m.group(1)) if m else position


def pack(
    inputs: list[tuple[str, dict[str, Any]]], rule: FileRule, planned: int
) -> list[tuple[int, tuple[int, int], list[Slice]]]:
    """(file number, planned shard span [a, b), slices) of every file with rows now."""
    files: dict[int, tuple[tuple[int, int], list[Slice]]] = {}
    for pos, (name, e) in enumerate(inputs):
        rows, idx = int(e["rows"]), shard_index(name, pos)
        if rows == 0:
            continue
        if rule.parts > 1:
            bounds = [round(i * rows / rule.parts) for i in range(rule.parts + 1)]
            for j, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
                if b > a:
                    sl = Slice(name, e["path"], e["sha256"], a, b)
                    files[idx * rule.parts + j] = ((idx, idx + 1), [sl])
            continue
        g = idx // rule.per_file
        span = (g * rule.per_file, max(min((g + 1) * rule.per_file, planned), idx + 1))
        files.setdefault(g, (span, []))[1].append(Slice(name, e["path"], e["sha256"], 0, rows))
    out = []
    for n in sorted(files):
        span, slices = files[n]
        slices.sort(key=lambda s: shard_index(s.shard, 0))
        out.append((n, span, slices))
    return out


def span_ready(span: tuple[int, int], committed: dict[str, Any]) -> bool:
    """Every planned shard of the span committed: the file will not change any more."""
    return all(shard_name(i) in committed for i in range(*span))


def run_complete(manifest: Manifest) -> bool:
    """Every planned shard labelled: the run's data is final, so are the card's counts."""
    labelled = manifest.entries("labelled")
    names = sorted(manifest.entries("rollouts"))
    n = planned_shards(manifest, names)
    if n == 0:
        return False
    if "shards" in manifest.data:
        return span_ready((0, n), labelled)
    return bool(names) and all(x in labelled for x in names)
