"""Writing the imported dataset's Parquet files: `rollouts` in files of a fixed row count
as rows stream in, `concepts` and `prompts` in one file each, all with the Hugging Face
features in their schema metadata so `datasets` loads them with their types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..publish.layout import SPLIT
from .facts import IMPORT_SCHEMA


def hf_schema(schema: pa.Schema) -> pa.Schema:
    import datasets

    feats = datasets.Features.from_arrow_schema(schema)
    meta = {"huggingface": json.dumps({"info": {"features": feats.to_dict()}}, sort_keys=True)}
    return schema.with_metadata(meta)


class RolloutFiles:
    """`rollouts/train-NNNNN.parquet`, a new file every `rows_per_file` rows."""

    def __init__(self, folder: Path, rows_per_file: int, rows_per_group: int) -> None:
        self.folder = folder / "rollouts"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = hf_schema(IMPORT_SCHEMA)
        self.rows_per_file = rows_per_file
        self.rows_per_group = rows_per_group
        self.buf: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_file = 0
        self.files: list[str] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.buf += rows
        while len(self.buf) >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        n = min(n, len(self.buf), self.rows_per_file - self.in_file)
        if self.writer is None:
            name = f"{SPLIT}-{len(self.files):05d}.parquet"
            self.files.append(f"rollouts/{name}")
            self.writer = pq.ParquetWriter(str(self.folder / name), self.schema,
                                           compression="zstd", compression_level=3,
                                           use_dictionary=True, store_schema=True)
        t = pa.Table.from_pylist(self.buf[:n], schema=self.schema)
        self.writer.write_table(t, row_group_size=n)
        self.buf = self.buf[n:]
        self.in_file += n
        if self.in_file >= self.rows_per_file:
            self.writer.close()
            self.writer, self.in_file = None, 0

    def close(self) -> list[str]:
        while self.buf:
            self._flush(len(self.buf))
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.files


def write_small(folder: Path, name: str, table: pa.Table) -> str:
    rel = f"{name}/{SPLIT}-00000.parquet"
    (folder / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(hf_schema(table.schema).metadata),
                   folder / rel, compression="zstd", store_schema=True)
    return rel
