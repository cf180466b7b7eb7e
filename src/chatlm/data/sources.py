"""Load training data as memory-mapped Arrow: parquet, JSON lines, text, dataset_info.json.

Every loader converts its source once, batch by batch, into an Arrow stream file in a cache
directory and returns ``datasets.Dataset.from_file(...)`` on it: rows stay on disk (the OS
pages them in), never in Python lists, so a 10x larger file costs no more RAM. The cache
file is named after the source path, size, mtime and column mapping, so an edited source
is converted again; conversion writes to a temporary name and renames (safe for several
processes at once).

Null values become ``""`` (rows are kept, so row ``i`` of the result is row ``i`` of the
file, as in the legacy scripts). Every problem is a :class:`DataError` whose one-line
message names the file and, where relevant, the column or key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from chatlm.errors import DataError
from chatlm.util.text import one_line

__all__ = [
    "DataError",
    "default_cache_dir",
    "iter_text_batches",
    "load_prompt_response",
    "load_text",
    "split_dataset_info_path",
]

#: Bump when the conversion changes, so old cache files are not reused.
_CACHE_VERSION = 1
#: Rows per record batch written to the cache (bounded memory while converting).
_BATCH_ROWS = 8192
_PARQUET_SUFFIXES = (".parquet", ".pq")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt",)
#: Legacy column pairs tried when the requested prompt/response columns are absent.
_FALLBACK_PAIRS = (("input", "target"), ("prompt", "response"))


def default_cache_dir() -> str:
    """Where converted Arrow files go: ``$CHATLM_CACHE_DIR`` or ``~/.cache/chatlm/arrow``."""
    root = os.environ.get("CHATLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "chatlm")
    return os.path.join(root, "arrow")


def split_dataset_info_path(path: str) -> tuple[str, str | None]:
    """Split ``DIR/dataset_info.json#NAME`` into (json path, NAME); other paths give (path, None)."""
    if "#" in path:
        file_part, name = path.rsplit("#", 1)
        if file_part.endswith(".json"):
            return file_part, name
    return path, None


# ----------------------------------------------------------------------------- public API
def load_prompt_response(
    path: str,
    prompt_column: str = "prompt",
    response_column: str = "response",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load prompt/response pairs as a memory-mapped Dataset with string columns ``prompt``, ``response``.

    Args:
        path: ``.parquet``, ``.jsonl`` / ``.json`` (JSON lines, or one JSON array), or
            ``DIR/dataset_info.json#NAME`` (a LLaMA-Factory ``alpaca`` entry: ``file_name``
            relative to DIR, ``columns`` mapping ``prompt`` / ``query`` / ``response``; a
            non-empty query is appended to the prompt after a newline).
        prompt_column: Column holding the prompts.
        response_column: Column holding the responses.
        cache_dir: Directory for the converted Arrow file (default :func:`default_cache_dir`).

    When neither requested column exists but the legacy pair ``input``/``target`` (or
    ``prompt``/``response``) does, that pair is used. Nulls become ``""``.

    Raises:
        DataError: missing / unreadable / empty file, missing column, unknown dataset NAME.
    """
    json_path, name = split_dataset_info_path(path)
    if name is not None:
        file_path, columns = _resolve_dataset_info(json_path, name)
        return _convert(file_path, columns, cache_dir, label=path)
    _check_file(path)
    if _kind(path) == "text":
        raise DataError(f"{path}: a .txt file has no prompt/response columns; use --data.format text")
    columns = _resolve_prompt_response_columns(path, prompt_column, response_column)
    return _convert(path, columns, cache_dir, label=path)


def load_text(path: str, text_column: str = "text", cache_dir: str | None = None) -> datasets.Dataset:
    """Load plain text documents as a memory-mapped Dataset with one string column ``text``.

    Args:
        path: ``.txt`` (one document per line, empty lines dropped) or a parquet / JSON
            lines file with the column ``text_column``.
        text_column: Column holding the text (parquet / JSON only).
        cache_dir: Directory for the converted Arrow file (default :func:`default_cache_dir`).

    Raises:
        DataError: missing / unreadable / empty file, missing column.
    """
    _check_file(path)
    if path.lower().endswith(_TEXT_SUFFIXES):
        return _convert(path, {"text": _Column("text")}, cache_dir, label=path, text_lines=True)
    existing = _source_columns(path)
    if text_column not in existing:
        raise DataError(f"{path}: no column {text_column!r}; columns are {sorted(existing)}")
    return _convert(path, {"text": _Column(text_column)}, cache_dir, label=path)


def iter_text_batches(path: str, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """Stream string columns of a file in record batches (bounded memory), nulls as "".

    Parquet / JSON: the named ``columns``; ``.txt``: one column ``text`` of non-empty lines.
    """
    _check_file(path)
    if _kind(path) == "text":
        yield from _text_batches(path)
        return
    existing = _source_columns(path)
    missing = [c for c in columns if c not in existing]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; columns are {sorted(existing)}")
    try:
        for batch in _source_batches(path, list(columns), text_lines=False):
            arrays = [_as_string(batch.column(c), path, c) for c in columns]
            yield pa.RecordBatch.from_arrays(arrays, names=list(columns))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read ({one_line(err, 160)})") from None


# ----------------------------------------------------------------------------- column mapping
class _Column:
    """An output column built from a source column, optionally joined with a second one."""

    def __init__(self, source: str, append: str | None = None, sep: str = "\n") -> None:
        self.source, self.append, self.sep = source, append, sep

    def sources(self) -> list[str]:
        return [self.source] + ([self.append] if self.append else [])

    def key(self) -> list[Any]:
        return [self.source, self.append, self.sep]

    def build(self, batch: pa.RecordBatch | pa.Table, label: str) -> pa.Array:
        """Compute the column from one batch: strings, nulls as ""; vectorised, no row loop."""
        out = _as_string(batch.column(self.source), label, self.source)
        if self.append:
            extra = _as_string(batch.column(self.append), label, self.append)
            joined = pc.binary_join_element_wise(out, extra, self.sep)
            out = pc.if_else(pc.greater(pc.utf8_length(extra), 0), joined, out)
        return out


def _as_string(array: pa.Array | pa.ChunkedArray, label: str, column: str) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.dictionary_decode()
        kind = array.type
    textual = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_null,
               pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    if not any(test(kind) for test in textual):
        raise DataError(f"{label}: column {column!r} has type {kind}, expected text")
    out = pc.fill_null(pc.cast(array, pa.string()), "")
    try:
        out.validate(full=True)  # string columns written by other tools may hold invalid UTF-8
    except pa.ArrowInvalid as err:
        raise DataError(f"{label}: column {column!r} is not valid UTF-8 text ({one_line(err, 160)})") from None
    return out


def _resolve_prompt_response_columns(path: str, prompt_column: str, response_column: str) -> dict[str, _Column]:
    existing = _source_columns(path)
    if prompt_column in existing and response_column in existing:
        return {"prompt": _Column(prompt_column), "response": _Column(response_column)}
    if prompt_column not in existing and response_column not in existing:
        for p, r in _FALLBACK_PAIRS:
            if p in existing and r in existing:
                return {"prompt": _Column(p), "response": _Column(r)}
    missing = [c for c in (prompt_column, response_column) if c not in existing]
    raise DataError(f"{path}: no column {missing[0]!r}; columns are {sorted(existing)}")


def _resolve_dataset_info(json_path: str, name: str) -> tuple[str, dict[str, _Column]]:
    """Read one LLaMA-Factory dataset_info.json entry -> (data file, output columns)."""
    _check_file(json_path)
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{json_path}: not a readable dataset_info.json ({one_line(err, 160)})") from None
    if not isinstance(info, dict):
        raise DataError(f"{json_path}: expected a JSON object of datasets, got {type(info).__name__}")
    if name not in info:
        raise DataError(f"{json_path}: no dataset {name!r}; datasets are {sorted(info)}")
    entry = info[name]
    if not isinstance(entry, dict) or not entry.get("file_name"):
        raise DataError(f"{json_path}#{name}: only local entries with 'file_name' are supported")
    formatting = entry.get("formatting", "alpaca")
    if formatting != "alpaca":
        raise DataError(f"{json_path}#{name}: formatting {formatting!r} is not supported (only 'alpaca')")
    file_path = os.path.join(os.path.dirname(os.path.abspath(json_path)), entry["file_name"])
    _check_file(file_path)
    mapping = {"prompt": "instruction", "query": "input", "response": "output", **(entry.get("columns") or {})}
    existing = _source_columns(file_path)
    prompt, response, query = mapping["prompt"], mapping["response"], mapping.get("query")
    if prompt not in existing and response not in existing:
        for p, r in _FALLBACK_PAIRS:
            if p in existing and r in existing:
                prompt, response, query = p, r, None
                break
    for role, column in (("prompt", prompt), ("response", response)):
        if column not in existing:
            raise DataError(f"{file_path}: no column {column!r} (columns.{role} of {json_path}#{name});"
                            f" columns are {sorted(existing)}")
    append = query if query and query in existing and query not in (prompt, response) else None
    return file_path, {"prompt": _Column(prompt, append=append), "response": _Column(response)}


# ----------------------------------------------------------------------------- reading sources
def _source_columns(path: str) -> list[str]:
    """Alias of :func:`source_columns` (kept for callers of the earlier private name)."""
    return source_columns(path)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")


def _kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(_JSON_SUFFIXES):
        return "json"
    if lower.endswith(_TEXT_SUFFIXES):
        return "text"
    raise DataError(f"{path}: unsupported file type; use .parquet, .jsonl, .json, .txt or dataset_info.json#NAME")


def _parquet_file(path: str) -> pq.ParquetFile:
    """Open a parquet file for streaming: buffered reads, no pre-buffering of whole row groups."""
    try:
        return pq.ParquetFile(path, memory_map=False, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({one_line(err, 160)})") from None


def source_columns(path: str) -> list[str]:
    """Column names of a parquet file (schema) or of a JSON file (keys of its first 1000 rows)."""
    kind = _kind(path)
    if kind == "parquet":
        with _parquet_file(path) as pf:
            return list(pf.schema_arrow.names)
    if kind == "json":
        keys: dict[str, None] = {}
        for rows in _iter_json_rows(path, max_rows=1000):
            for row in rows:
                keys.update(dict.fromkeys(row))
            break
        return list(keys)
    return []


def _iter_json_rows(path: str, max_rows: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """Yield lists of row dicts from JSON lines (streamed) or a top-level JSON array."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                # A JSON array cannot be streamed with the standard library; keep it for small
                # files (LLaMA-Factory style) and use JSON lines for large ones.
                rows = json.load(f)
                _check_rows(path, rows, 1)
                rows = rows if max_rows is None else rows[:max_rows]
                for start in range(0, len(rows), _BATCH_ROWS):
                    yield rows[start:start + _BATCH_ROWS]
                return
            chunk: list[dict[str, Any]] = []
            seen = 0
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
                _check_rows(path, [row], lineno)
                chunk.append(row)
                seen += 1
                if len(chunk) >= _BATCH_ROWS or (max_rows is not None and seen >= max_rows):
                    yield chunk
                    chunk = []
                    if max_rows is not None and seen >= max_rows:
                        return
            if chunk:
                yield chunk
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({one_line(err, 160)})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({one_line(err, 160)})") from None


def _check_rows(path: str, rows: Any, lineno: int) -> None:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: line {lineno}: expected JSON objects (one per line, or an array of objects)")


def _json_batches(path: str, sources: list[str]) -> Iterator[pa.RecordBatch]:
    for rows in _iter_json_rows(path):
        arrays = []
        for name in sources:
            values = [_json_text(row.get(name), path, name) for row in rows]
            arrays.append(pa.array(values, type=pa.string()))
        yield pa.RecordBatch.from_arrays(arrays, names=sources)


def _json_text(value: Any, path: str, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise DataError(f"{path}: column {column!r} holds {type(value).__name__} values, expected text")


def _text_batches(path: str) -> Iterator[pa.RecordBatch]:
    try:
        with open(path, encoding="utf-8") as f:
            chunk: list[str] = []
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    chunk.append(line)
                if len(chunk) >= _BATCH_ROWS:
                    yield pa.RecordBatch.from_arrays([pa.array(chunk, type=pa.string())], names=["text"])
                    chunk = []
            if chunk:
                yield pa.RecordBatch.from_arrays([pa.array(chunk, type=pa.string())], names=["text"])
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({one_line(err, 160)})") from None


def _source_batches(path: str, sources: list[str], text_lines: bool) -> Iterator[pa.RecordBatch]:
    if text_lines:
        yield from _text_batches(path)
    elif _kind(path) == "parquet":
        with _parquet_file(path) as pf:
            yield from pf.iter_batches(batch_size=_BATCH_ROWS, columns=sources)
    else:
        yield from _json_batches(path, sources)


# ----------------------------------------------------------------------------- Arrow cache
def _cache_path(path: str, columns: dict[str, _Column], cache_dir: str | None, text_lines: bool) -> str:
    stat = os.stat(path)
    key = json.dumps([_CACHE_VERSION, os.path.abspath(path), stat.st_size, stat.st_mtime_ns, text_lines,
                      {k: c.key() for k, c in columns.items()}])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir or default_cache_dir(), f"{stem}-{digest}.arrow")


def _convert(
    path: str,
    columns: dict[str, _Column],
    cache_dir: str | None,
    label: str,
    text_lines: bool = False,
) -> datasets.Dataset:
    """Convert ``path`` (once) to an Arrow stream file with ``columns`` and memory-map it."""
    target = _cache_path(path, columns, cache_dir, text_lines)
    if not os.path.exists(target):
        sources = list(dict.fromkeys(s for c in columns.values() for s in c.sources()))
        _write_arrow(target, _source_batches(path, sources, text_lines), columns, label)
    try:
        ds = datasets.Dataset.from_file(target)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{label}: cannot open its Arrow cache {target} ({one_line(err, 160)})") from None
    if len(ds) == 0:
        raise DataError(f"{label}: no rows")
    for name in ("response", "text"):  # the column the loss is computed on
        if name in columns and name in ds.column_names:
            longest = pc.max(pc.binary_length(ds.data.column(name))).as_py()
            if not longest:
                raise DataError(f"{label}: column {columns[name].source!r} is empty (null or \"\") in every row")
    return ds


def _write_arrow(
    target: str,
    batches: Iterable[pa.RecordBatch],
    columns: dict[str, _Column],
    label: str,
) -> None:
    schema = pa.schema([(name, pa.string()) for name in columns])
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".arrow", dir=directory)
    except OSError as err:
        raise DataError(f"{label}: cannot write the Arrow cache in {directory} ({one_line(err, 160)})") from None
    try:
        with os.fdopen(fd, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                arrays = [col.build(batch, label) for col in columns.values()]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
        os.replace(tmp, target)
    except DataError:
        _unlink(tmp)
        raise
    except (pa.ArrowException, OSError, KeyError) as err:
        _unlink(tmp)
        raise DataError(f"{label}: cannot read ({one_line(err, 160)})") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

