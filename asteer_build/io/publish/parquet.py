"""Writing one output Parquet file: fixed writer settings and no timestamps, rows in plan
order, fixed-size row groups whatever the input shard boundaries, the `datasets` features
embedded in the schema, and an atomic commit. Same inputs, same bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ...core import atomic
from ...pipeline.shards import Store
from .layout import PublishError, PublishOptions
from .plan import ConfigPlan, OutFile, RunInfo, Slice


def _hf_metadata(schema: pa.Schema, features: Any | None) -> pa.Schema:
    """Embed the `datasets` features so `load_dataset("parquet", data_files=...)` gets
    the declared types even without the card (e.g. Array3D for activations)."""
    if features is None:
        return schema.remove_metadata()
    meta = {"huggingface": json.dumps({"info": {"features": features.to_dict()}}, sort_keys=True)}
    return schema.remove_metadata().with_metadata(meta)


class _ParquetOut:
    """Writes one output file in fixed-size row groups regardless of input boundaries."""

    def __init__(self, dest: Path, schema: pa.Schema, rows_per_group: int) -> None:
        self.dest = dest
        self.tmp = atomic.temp_path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_group = max(1, rows_per_group)
        self.writer = pq.ParquetWriter(
            str(self.tmp),
            schema,
            compression="zstd",
            compression_level=3,
            use_dictionary=True,
            write_statistics=True,
            store_schema=True,
        )
        self.buf: list[pa.Table] = []
        self.buffered = 0
        self.rows = 0
        self.nbytes = 0

    def add(self, table: pa.Table) -> None:
        self.buf.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self.buf)
        head, rest = t.slice(0, n), t.slice(n)
        head = head.combine_chunks()
        self.writer.write_table(head, row_group_size=n)
        self.rows += head.num_rows
        self.nbytes += head.nbytes
        self.buf = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows

    def close(self) -> tuple[int, int]:
        if self.buffered:
            self._flush(self.buffered)
        self.writer.close()
        atomic.commit(self.tmp, self.dest)
        return self.rows, self.nbytes

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns of `schema` in its order and types; a column the shard lacks (e.g. the
    judge columns of a not yet labelled shard, or features of an offset another model
    dropped) becomes nulls."""
    cols = []
    for f in schema:
        if f.name in t.column_names:
            col = t.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _rows_per_group(schema: pa.Schema, sample: pa.Table, opts: PublishOptions) -> int:
    per_row = max(1.0, sample.nbytes / max(sample.num_rows, 1))
    return int(max(1, min(opts.row_group_max_rows, opts.row_group_bytes // per_row)))


def _read_slice(store: Store, s: Slice) -> pa.Table:
    t = pq.read_table(store.path(s.path), filesystem=store.fs)
    if s.start or s.stop != t.num_rows:
        t = t.slice(s.start, s.stop - s.start)
    return t


def write_file(
    info: RunInfo, cp: ConfigPlan, out: OutFile, folder: Path, opts: PublishOptions
) -> tuple[int, int]:
    schema = _hf_metadata(cp.schema, cp.features)
    dest = folder / out.path
    if cp.table is not None:
        t = _conform(cp.table, schema)
        w = _ParquetOut(dest, schema, _rows_per_group(schema, t, opts))
        try:
            w.add(t)
            return w.close()
        except BaseException:
            w.abort()
            raise
    w: _ParquetOut | None = None
    try:
        for s in out.slices:
            t = _conform(_read_slice(info.store, s), schema)
            if w is None:
                w = _ParquetOut(dest, schema, _rows_per_group(schema, t, opts))
            w.add(t)
        if w is None:
            raise PublishError(f"{out.path}: planned with no rows")
        return w.close()
    except BaseException:
        if w is not None:
            w.abort()
        raise
