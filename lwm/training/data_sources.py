"""Where examples come from: newline-delimited JSON (a local file or any fsspec URL) and Hugging Face `datasets`.

Each reader yields this data-parallel host's share of the examples (example i goes to rank i % dp_size), in
file order, starting over at the end, from a saved position. It yields records (kind, payload, loc, index,
epoch): kind 'ok' (payload: the processor's Example), 'blank' (an empty line) or 'bad' (payload: why the line
is not a JSON object); `loc` is the byte offset after the line (0 for Hugging Face), `index` the example's
number in the file or split, `epoch` the number of passes before this one. For example, a 4-line file read
by rank 1 of 2 from the start yields the records of lines 1 and 3, then of lines 1 and 3 with epoch 1, ...
lwm/training/dataset.py turns records into batches (and counts, logs and resumes them).
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections import deque

from lwm.parallel.multihost import HostShard


class DataFormatError(ValueError):
    """An example that cannot be turned into tokens: names the file (or dataset), line and field."""


# ------------------------------------------------------------------------------------------ JSON lines

def check_json_file(path: str, section: str) -> None:
    """Raise unless `path` names a non-empty file; `section` (e.g. 'json_dataset') prefixes the message."""
    if not path:
        raise ValueError(f"{section}.path is empty: give a JSON-lines file (local path or fsspec URL)")
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path) or fs.isdir(fs_path):
        raise FileNotFoundError(f"{section}.path={path!r}: no such file")
    if fs.size(fs_path) == 0:
        raise ValueError(f"{section}.path={path!r}: the file is empty")


def json_records(path: str, processor, source: str, loc: int, index: int, epoch: int, host: HostShard,
                 processes: int = 1, batch_size: int = 1024, chunk_size: int = 32):
    """Records of this host's lines of `path` from byte offset `loc` (line `index`, pass `epoch`) on, each
    line parsed and passed to `processor(example, index)`; in `processes` worker processes when > 1 (same
    order). A DataFormatError of the processor is raised again naming `source` and the line."""
    lines = _read_lines(path, loc, index, epoch, host)
    if processes == 1:
        return (_process_line(processor, source, *item) for item in lines)
    return _parallel_process(lines, processor, source, processes, batch_size, chunk_size)


def _read_lines(path: str, loc: int, index: int, epoch: int, host: HostShard):
    """Raw lines of this data-parallel shard (line index % dp_size == dp_rank) from byte offset `loc`,
    starting over at EOF: yields (line bytes, offset after the line, line index, epoch)."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        f.seek(loc)
        full_pass, found = loc == 0, False
        while True:
            line = f.readline()
            if not line:
                if full_pass and not found:
                    raise ValueError(f"{path}: a full pass found no line for data-parallel rank {host.dp_rank} of "
                                     f"{host.dp_size} (file has {index} lines)")
                f.seek(0)
                index, epoch, full_pass, found = 0, epoch + 1, True, False
                continue
            if index % host.dp_size == host.dp_rank:
                found = True
                yield line, f.tell(), index, epoch
            index += 1


def _process_line(processor, source: str, line: bytes, loc: int, index: int, epoch: int):
    """One raw line -> ('ok', Example, ...), ('blank', None, ...) or ('bad', reason, ...)."""
    if not line.strip():
        return "blank", None, loc, index, epoch
    try:
        example = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return "bad", f"{type(e).__name__}: {e}", loc, index, epoch
    if not isinstance(example, dict):
        return "bad", f"expected a JSON object, got {type(example).__name__}", loc, index, epoch
    try:
        return "ok", processor(example, index), loc, index, epoch
    except DataFormatError as e:
        raise DataFormatError(f"{source}, line {index + 1}: {e}") from None


_WORKER: tuple = ()


def _worker_init(processor, source):
    global _WORKER
    _WORKER = (processor, source)


def _worker_process(item):
    return _process_line(*_WORKER, *item)


def _parallel_process(lines, processor, source: str, processes: int, batch_size: int, chunk_size: int):
    """`_process_line` over `lines` in `processes` worker processes, results in input order. Two batches of
    `batch_size` lines are in flight while the caller consumes a third. A worker that dies raises
    BrokenProcessPool instead of hanging."""
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run JAX threads
    pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_init, initargs=(processor, source))
    in_flight = deque()

    def submit():
        batch = list(itertools.islice(lines, batch_size))
        if batch:
            in_flight.append(pool.map(_worker_process, batch, chunksize=chunk_size))

    try:
        submit(), submit()
        while in_flight:
            results = in_flight.popleft()
            submit()
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------- Hugging Face

_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
                       ".arrow": "arrow"}


def load_hf(path: str, name: str, split: str, streaming: bool):
    """A hub id (from the local cache; `name` picks its configuration), a local directory, or a local
    .json/.jsonl/.parquet/.csv/.txt/.arrow file -> that split as a `datasets` dataset."""
    import datasets

    if not split:
        raise ValueError("huggingface_dataset.split is empty: name one split (e.g. 'train')")
    ext = os.path.splitext(path)[1].lower()
    try:
        if os.path.isfile(path):  # a local data file: `name` does not apply
            if ext not in _DATA_FILE_BUILDERS:
                raise ValueError(f"huggingface_dataset.path={path!r}: unknown data file type {ext!r}; expected "
                                 f"one of {sorted(_DATA_FILE_BUILDERS)}")
            return datasets.load_dataset(_DATA_FILE_BUILDERS[ext], data_files=path, split=split, streaming=streaming)
        if os.path.isdir(path):
            return datasets.load_dataset(path, split=split, streaming=streaming)
        return datasets.load_dataset(path, name or None, split=split, streaming=streaming)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise FileNotFoundError(f"huggingface_dataset.path={path!r}: not a local file or directory and not "
                                f"available offline ({type(e).__name__}: {e})") from None


def hf_records(dataset, processor, source: str, index: int, epoch: int, host: HostShard):
    """Records ('ok' only) of this host's examples of `dataset` from example `index` (pass `epoch`) on;
    resuming skips the examples before `index` without processing them."""
    h = host
    while True:
        seen = found = 0
        for i, example in enumerate(dataset.skip(index) if index else dataset, start=index):
            seen += 1
            if i % h.dp_size != h.dp_rank:
                continue
            found += 1
            try:
                yield "ok", processor(example, i), 0, i, epoch
            except DataFormatError as e:
                raise DataFormatError(f"{source}, example {i}: {e}") from None
        if index == 0 and not found:
            raise ValueError(f"{source}: a full pass ({seen} examples) found none for data-parallel "
                             f"rank {h.dp_rank} of {h.dp_size}")
        index, epoch = 0, epoch + 1
