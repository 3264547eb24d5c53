"""Data pipelines: the original LWM dataset configuration, plus masked sequence packing and exact resume.

    config = DatasetFactory.get_default_config({"type": "json", "text_processor": {"fields": "[question],answer"},
                                                "json_dataset": {"path": "train.jsonl", "seq_length": 2048,
                                                                 "batch_size": 8, "mode": "pack"}})
    host = multihost.host_shard_from_mesh(mesh)   # or None: every process builds whole batches
    dataset = DatasetFactory.load_dataset(config, tokenizer, host=host)
    for batch, metrics in dataset:          # batch: dict of (B_local, T_local) numpy arrays
        batch = multihost.global_batch(batch, mesh, host)
    state = dataset.get_state_dict()        # plain data: pickle it; load_state_dict resumes exactly

Field syntax (`text_processor.fields`, or a per-example field string named by `fields_from_example`):
comma-separated fields; `a+b` joins example["a"] and example["b"] with `subfield_separator`; `[field]` gives
its tokens no loss; `<|bos|>` / `<|eos|>` insert those ids; `prepend_text` goes before the first field
(only when field 0 is text, as in the original). BOS (no loss) starts and EOS (with loss) ends every example
when `add_bos_token` / `add_eos_token`. Vision-text examples also accept fields whose name contains
`vision`: lists of VQ codes, `n_tokens_per_frame` per frame, written `<vision> f0 eof f1 ... eov </vision>`.
See docs/data.md for the modes (`no_pad`, `pad`, `pack`), loss weighting and how they differ from the original.
The readers (JSON lines, Hugging Face `datasets`) are in lwm/training/data_sources.py, the batchers in lwm/training/packing.py.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping

import numpy as np
from ml_collections import ConfigDict

from lwm.utils.config_dict import update_locked
from lwm.training.data_sources import DataFormatError, check_json_file, hf_records, json_records, load_hf
from lwm.parallel.multihost import HostShard
from lwm.training.packing import LOSS_WEIGHTINGS, PACK_OVERFLOW, ConcatBatcher, Example, PackBatcher

__all__ = ["DatasetFactory", "TextProcessor", "VisionTextProcessor", "JsonDataset", "JsonVisionDataset",
           "HuggingfaceDataset", "DataFormatError"]

logger = logging.getLogger(__name__)
MODES = ("no_pad", "pad", "pack")


# ----------------------------------------------------------------------------------------------- processors

def _get_field(example: Mapping, field: str):
    if field not in example:
        raise DataFormatError(f"missing field {field!r} (example has {sorted(example)[:10]})")
    return example[field]


def _text_field(example: Mapping, field: str, separator: str) -> str:
    parts = []
    for sub in field.split("+"):
        value = _get_field(example, sub)
        if not isinstance(value, str):
            raise DataFormatError(f"field {sub!r} is {type(value).__name__}, expected a string")
        parts.append(value)
    return separator.join(parts)


def _parse_field(field: str) -> tuple[str, float]:
    """'[name]' -> ('name', 0.0): no loss on it; 'name' -> ('name', 1.0)."""
    if field.startswith("[") and field.endswith("]"):
        return field[1:-1], 0.0
    return field, 1.0


class DatasetStateMismatch(ValueError):
    """A saved dataset state whose `section`.`key` (path, seq_length, ...) differs from this run's: resuming
    would not continue the same stream. lwm.training.loop adds which flag to change."""

    def __init__(self, section: str, key: str, saved, current):
        self.section, self.key, self.saved, self.current = section, key, saved, current
        super().__init__(f"dataset state was saved with {section}.{key}={saved!r}, this run has {current!r}; "
                         "resuming would not continue the same stream")


class TextProcessor:
    """Example dict -> Example(tokens, loss_masks, vision_masks) following the field syntax (module doc).

    With a tokenizer where 'Q?' -> [7, 8] and 'A.' -> [9], BOS 1, EOS 2, fields '[q],a' and the example
    {"q": "Q?", "a": "A."}:
        tokens      1  7  8  9  2
        loss_masks  0  0  0  1  1      (the weight of predicting each token; see lwm/training/packing.py)
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.fields_from_example = ""
        config.fields = ""
        config.subfield_separator = " "
        config.add_bos_token = True
        config.add_eos_token = True
        config.prepend_text = ""
        return update_locked(config, updates, "text_processor")

    def __init__(self, config, tokenizer):
        self.config = self.get_default_config(config)
        if not self.config.fields and not self.config.fields_from_example:
            raise ValueError("text_processor: set `fields` or `fields_from_example`")
        self.tokenizer = tokenizer

    def _fields(self, example: Mapping, index: int = 0) -> list[str]:
        if self.config.fields_from_example:
            spec = _get_field(example, self.config.fields_from_example)
            if not isinstance(spec, str):
                raise DataFormatError(f"field {self.config.fields_from_example!r} (fields_from_example) is "
                                      f"{type(spec).__name__}, expected a comma-separated string")
            return spec.split(",")
        return self.config.fields.split(",")

    def _special_or_text(self, example, i: int, field: str, mask: float, tokens: list, loss: list) -> None:
        """Append the ids and loss masks of a `<|bos|>`, `<|eos|>` or text field (field number i)."""
        if field == "<|bos|>":
            tokens.append([self.tokenizer.bos_id])
        elif field == "<|eos|>":
            tokens.append([self.tokenizer.eos_id])
        else:
            text = _text_field(example, field, self.config.subfield_separator)
            if i == 0:
                text = self.config.prepend_text + text
            tokens.append(self.tokenizer.encode(text))
        loss.append(np.full(len(tokens[-1]), mask, np.float32))

    def __call__(self, example: Mapping, index: int = 0) -> Example:
        tokens, loss = [], []
        if self.config.add_bos_token:
            tokens.append([self.tokenizer.bos_id])
            loss.append(np.zeros(1, np.float32))
        for i, raw in enumerate(self._fields(example, index)):
            field, mask = _parse_field(raw)
            self._special_or_text(example, i, field, mask, tokens, loss)
        if self.config.add_eos_token:
            tokens.append([self.tokenizer.eos_id])
            loss.append(np.ones(1, np.float32))
        return _join(tokens, loss)


def _join(tokens, loss, vision=None) -> Example:
    if not tokens:
        return Example.of([], [])
    t = np.concatenate([np.asarray(x, np.int32) for x in tokens])
    v = np.zeros(len(t), bool) if vision is None else np.concatenate(vision)
    return Example(t, np.concatenate(loss), v)


class VisionTextProcessor(TextProcessor):
    """Text fields as TextProcessor; a field whose name contains 'vision' is a list of VQ codes:

        <vision> [frame 0: n_tokens_per_frame codes] eof ... [last frame] eov </vision>

    `<vision>`/`</vision>` are tokenized text (no BOS in front, unlike the original) with vision mask False;
    codes and eof/eov have vision mask True. `max_n_frames` > 0 keeps that many frames, uniformly spaced.
    When `fields_from_example` names a list of field strings, `fields_index` >= 0 picks one, otherwise one
    is drawn with `random.Random(line_index)` (deterministic, as the original).
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.fields_from_example = ""
        config.subfield_separator = " "
        config.add_bos_token = True
        config.add_eos_token = True
        config.prepend_text = ""
        config.fields_index = -1
        config.eof_token = 8192  # end of each frame
        config.eov_token = 8193  # end of the vision span
        config.n_tokens_per_frame = 256  # 16 x 16 VQ codes
        config.max_n_frames = -1
        return update_locked(config, updates, "vision_text_processor")

    def __init__(self, config, tokenizer):
        self.config = self.get_default_config(config)
        if not self.config.fields_from_example:
            raise ValueError("vision_text_processor.fields_from_example must be set")
        if self.config.n_tokens_per_frame <= 0:
            raise ValueError(f"vision_text_processor.n_tokens_per_frame={self.config.n_tokens_per_frame}: must be > 0")
        self.tokenizer = tokenizer
        self.vision_start = np.asarray(tokenizer.encode("<vision>"), np.int32)
        self.vision_end = np.asarray(tokenizer.encode("</vision>"), np.int32)

    def _fields(self, example: Mapping, index: int = 0) -> list[str]:
        key = self.config.fields_from_example
        spec = _get_field(example, key)
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise DataFormatError(f"field {key!r} (fields_from_example) is an empty list")
            spec = spec[self.config.fields_index] if self.config.fields_index >= 0 else random.Random(index).choice(spec)
        if not isinstance(spec, str):
            raise DataFormatError(f"field {key!r} (fields_from_example) is {type(spec).__name__}, expected a string")
        return spec.split(",")

    def _vision(self, example: Mapping, field: str) -> np.ndarray:
        codes = np.asarray(_get_field(example, field))
        per = self.config.n_tokens_per_frame
        if codes.ndim != 1 or (codes.size and not np.issubdtype(codes.dtype, np.integer)):
            raise DataFormatError(f"vision field {field!r} must be a flat list of integer codes")
        if codes.size == 0 or codes.size % per:
            raise DataFormatError(f"vision field {field!r} has {codes.size} tokens, not a positive multiple of "
                                  f"n_tokens_per_frame={per}")
        frames = codes.reshape(-1, per)
        if 0 < self.config.max_n_frames < len(frames):
            frames = frames[np.linspace(0, len(frames) - 1, self.config.max_n_frames).astype(int)]
        ends = np.full((len(frames), 1), self.config.eof_token)
        ends[-1] = self.config.eov_token
        return np.concatenate([frames, ends], axis=1).reshape(-1).astype(np.int32)  # (n_frames * (per + 1),)

    def __call__(self, example: Mapping, index: int = 0) -> Example:
        tokens, loss, vision = [], [], []

        def push(ids, mask, is_vision):
            tokens.append(np.asarray(ids, np.int32))
            loss.append(np.full(len(ids), mask, np.float32))
            vision.append(np.full(len(ids), is_vision, bool))

        if self.config.add_bos_token:
            push([self.tokenizer.bos_id], 0.0, False)
        for i, raw in enumerate(self._fields(example, index)):
            field, mask = _parse_field(raw)
            if field not in ("<|bos|>", "<|eos|>") and "vision" in field:
                push(self.vision_start, mask, False)
                push(self._vision(example, field), mask, True)
                push(self.vision_end, mask, False)
            else:
                before = len(tokens)
                self._special_or_text(example, i, field, mask, tokens, loss)
                vision.extend(np.zeros(len(t), bool) for t in tokens[before:])
        if self.config.add_eos_token:
            push([self.tokenizer.eos_id], 1.0, False)
        return _join(tokens, loss, vision)


# ------------------------------------------------------------------------------------------------ datasets

def _dataset_config(section: str, seq_length: int, batch_size: int, mode: str, updates) -> ConfigDict:
    config = ConfigDict()
    config.path = ""
    config.seq_length = seq_length
    config.batch_size = batch_size
    config.always_start_with_bos = False
    config.start_seek_loc = 0
    config.example_index_at_start = 0
    config.tokens_count_at_start = 0
    config.tokenizer_processes = 1
    config.tokenizer_parallel_chunk_size = 32
    config.tokenizer_parallel_batch_size = 1024
    config.throughput_average_window_size = 200
    config.use_data_sharded_loader = True  # the original's spelling of lwm.train's --use_data_sharded_loader:
    #                                        the run checks they agree; the dataset itself follows `host`
    config.pad = False  # the original text dataset's switch; same as mode='pad'
    config.mode = mode  # no_pad | pad | pack
    config.pack_overflow = "truncate"  # truncate | split: an example longer than a row
    config.loss_weighting = "token"  # token | example (pad/pack only)
    config.cross_example_attention = False  # pack only: True drops the mask between a row's examples (naive
    #                                         packing, the ablation of masked packing; lwm.training.packing.pack_rows)
    config.text_loss_weight = 1.0  # how the trainer mixes per-modality losses
    config.vision_loss_weight = 1.0
    return update_locked(config, updates, section)


class _Throughput:
    """The original's dataset_accumulated_tps / dataset_average_tps (average over a window of steps)."""

    def __init__(self, window: int, start_tokens: int):
        self.window, self.start_tokens = window, start_tokens
        self.start = self.last = time.time()
        self.steps: list[float] = []

    def __call__(self, total_tokens: int, step_tokens: int) -> dict:
        now = time.time()
        self.steps = (self.steps + [max(now - self.last, 1e-9)])[-self.window:]
        self.last = now
        return {"dataset_accumulated_tps": (total_tokens - self.start_tokens) / max(now - self.start, 1e-9),
                "dataset_average_tps": step_tokens / float(np.mean(self.steps))}


class _BaseDataset:
    """Shared by the JSON and Hugging Face datasets: records -> batcher -> batches, with the state needed
    for exact resume. Subclasses provide `_records()` (a reader of lwm/training/data_sources.py), yielding
    (kind, example, loc, index, epoch) with kind 'ok', 'blank' or 'bad' (then `example` is the error text),
    in stream order."""

    section = "dataset"
    source = ""

    def __init__(self, config, tokenizer, processor, host: HostShard | None = None):
        self._tokenizer, self._processor = tokenizer, processor
        c = self.config
        if c.pad and c.mode == "no_pad":
            c.mode = "pad"
        if c.mode not in MODES:
            raise ValueError(f"{self.section}.mode={c.mode!r}: expected one of {MODES}")
        if c.pack_overflow not in PACK_OVERFLOW:
            raise ValueError(f"{self.section}.pack_overflow={c.pack_overflow!r}: expected one of {PACK_OVERFLOW}")
        if c.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"{self.section}.loss_weighting={c.loss_weighting!r}: expected one of {LOSS_WEIGHTINGS}")
        if c.cross_example_attention and c.mode != "pack":
            raise ValueError(f"{self.section}.cross_example_attention=True needs mode 'pack' (mode is {c.mode!r})")
        if c.loss_weighting == "example" and c.mode == "no_pad":
            raise ValueError(f"{self.section}.loss_weighting='example' needs mode 'pad' or 'pack' (no_pad has no "
                             "example boundaries)")
        self.host = host if host is not None else HostShard()   # None: this process builds whole batches
        h = self.host
        if c.batch_size % h.dp_size or c.seq_length % h.sp_size:
            raise ValueError(f"{self.section}: batch_size={c.batch_size} must divide by {h.dp_size} data-parallel "
                             f"hosts and seq_length={c.seq_length} by {h.sp_size} sequence-parallel hosts")
        self.local_batch_size = c.batch_size // h.dp_size
        self._pos = {"file_loc": c.start_seek_loc, "next_index": c.example_index_at_start, "epoch": 0}
        self._total_tokens = c.tokens_count_at_start
        self._counts = {"malformed_lines": 0, "blank_lines": 0, "empty_examples": 0, "usable_in_epoch": 0,
                        "pass_complete": c.start_seek_loc == 0 and c.example_index_at_start == 0}
        self._min_tokens = 1 if c.mode == "no_pad" else 2  # an example shorter than this adds no target
        self._batcher = self._make_batcher()

    def _make_batcher(self):
        c = self.config
        if c.mode == "no_pad":
            return ConcatBatcher(self.local_batch_size, c.seq_length, self._tokenizer.bos_id, c.always_start_with_bos)
        return PackBatcher(self.local_batch_size, c.seq_length, self._tokenizer.pad_id,
                           max_per_row=1 if c.mode == "pad" else 0, overflow=c.pack_overflow,
                           loss_weighting=c.loss_weighting, segments=c.mode == "pack",
                           cross_example_attention=c.cross_example_attention)

    def _records(self):
        raise NotImplementedError

    def _note(self, kind, payload, loc, index, epoch):
        """Book-keeping for one record, in stream order; raises when a whole pass had no usable example."""
        counts = self._counts
        if epoch != self._pos["epoch"]:
            if counts["pass_complete"] and counts["usable_in_epoch"] == 0:
                raise ValueError(f"{self.source}: a full pass found no usable example for data-parallel rank "
                                 f"{self.host.dp_rank} of {self.host.dp_size} ({counts['malformed_lines']} malformed "
                                 f"lines, {counts['blank_lines']} blank lines, {counts['empty_examples']} examples "
                                 f"with fewer than {self._min_tokens} tokens so far)")
            counts["usable_in_epoch"], counts["pass_complete"] = 0, True
        self._pos = {"file_loc": loc, "next_index": index + 1, "epoch": epoch}
        if kind == "bad":
            counts["malformed_lines"] += 1
            logger.warning("%s, line %d: skipped malformed example (%s)", self.source, index + 1, payload)
        elif kind == "blank":
            counts["blank_lines"] += 1
        elif kind == "empty":
            counts["empty_examples"] += 1
        else:
            counts["usable_in_epoch"] += 1

    def __iter__(self):
        c, h = self.config, self.host
        global_chunk = c.batch_size * c.seq_length
        throughput = _Throughput(c.throughput_average_window_size, self._total_tokens)
        t_local = c.seq_length // h.sp_size
        cols = slice(h.sp_rank * t_local, (h.sp_rank + 1) * t_local)
        for kind, example, loc, index, epoch in self._records():
            if kind == "ok" and len(example) < self._min_tokens:
                kind = "empty"
            self._note(kind, example, loc, index, epoch)
            if kind != "ok":
                continue
            self._batcher.add(example)
            while (batch := self._batcher.pop()) is not None:
                self._total_tokens += global_chunk
                metrics = {"dataset_file_loc": loc, "dataset_example_index": index,
                           "dataset_total_tokens": self._total_tokens, "dataset_epoch": epoch,
                           "dataset_malformed_lines": self._counts["malformed_lines"],
                           **throughput(self._total_tokens, global_chunk),
                           **{f"dataset_{k}": v for k, v in self._batcher.stats().items()}}
                if h.sp_size > 1:
                    batch = {k: v[:, cols] for k, v in batch.items()}
                yield batch, metrics

    def get_state_dict(self) -> dict:
        """Everything needed to continue exactly: position of the next record, buffered examples, counters.
        Plain data (dicts, lists, numbers, numpy arrays): safe to pickle and load with lwm.utils.safe_pickle."""
        return {"config": self.config.to_dict(), "host": self.host.to_dict(), **self._pos,
                "total_tokens": self._total_tokens, "counts": dict(self._counts),
                "batcher": self._batcher.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        saved = state.get("config", {})
        for key in ("path", "seq_length", "batch_size", "mode", "pack_overflow", "loss_weighting",
                    "cross_example_attention"):
            if key in saved and saved[key] != self.config[key]:
                raise DatasetStateMismatch(self.section, key, saved[key], self.config[key])
        if "host" in state and state["host"] != self.host.to_dict():
            raise ValueError(f"dataset state was saved for host shard {state['host']}, this process is "
                             f"{self.host.to_dict()}")
        if "next_index" in state:
            self._pos = {k: state[k] for k in ("file_loc", "next_index", "epoch")}
        else:  # the original's state: index of the last example read, file position after it
            self._pos = {"file_loc": state.get("file_loc", self.config.start_seek_loc),
                         "next_index": state.get("index", self.config.example_index_at_start - 1) + 1, "epoch": 0}
        self._total_tokens = state.get("total_tokens", self.config.tokens_count_at_start)
        self._counts.update(state.get("counts", {}))
        self._batcher = self._make_batcher()
        if "batcher" in state:
            self._batcher.load_state_dict(state["batcher"])

    @property
    def seq_length(self) -> int:
        return self.config.seq_length

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def text_processor(self):
        return self._processor

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def loss_weights(self) -> dict:
        """Per-modality weights for the trainer: loss = text * text_loss + vision * vision_loss."""
        return {"text": float(self.config.text_loss_weight), "vision": float(self.config.vision_loss_weight)}


# ------------------------------------------- JSON lines and Hugging Face (their readers: lwm/training/data_sources.py)

class JsonDataset(_BaseDataset):
    """Newline-delimited JSON, one example per line, local or any fsspec URL (`path`). Lines of other
    data-parallel hosts are skipped unparsed; `tokenizer_processes` > 1 parses and tokenizes in worker
    processes, keeping the order. Malformed lines are skipped, logged with their line number and counted
    (`dataset_malformed_lines`); a missing field raises DataFormatError naming it and the line."""

    section = "json_dataset"

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = _dataset_config("json_dataset", 1024, 8, "no_pad", None)
        config.vision_loss_weight = 0.0
        return update_locked(config, updates, "json_dataset")

    def __init__(self, config, tokenizer, processor, host: HostShard | None = None):
        self.config = self.get_default_config(config)
        self.source = self.config.path
        check_json_file(self.config.path, self.section)
        if self.config.tokenizer_processes < 1:
            raise ValueError(f"{self.section}.tokenizer_processes={self.config.tokenizer_processes}: must be >= 1")
        super().__init__(self.config, tokenizer, processor, host)

    def _records(self):
        c, pos = self.config, self._pos
        return json_records(c.path, self._processor, self.source, pos["file_loc"], pos["next_index"], pos["epoch"],
                            self.host, c.tokenizer_processes, c.tokenizer_parallel_batch_size,
                            c.tokenizer_parallel_chunk_size)


class JsonVisionDataset(JsonDataset):
    """JsonDataset with the original vision defaults: seq_length 384, batch 4, mode 'pad', loss 0.5/0.5."""

    section = "json_vision_dataset"

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = _dataset_config("json_vision_dataset", 384, 4, "pad", None)
        config.text_loss_weight = config.vision_loss_weight = 0.5
        return update_locked(config, updates, "json_vision_dataset")


class HuggingfaceDataset(_BaseDataset):
    """A `datasets` dataset (hub id from the local cache, a local directory, or a local .jsonl/.parquet/...
    file; `name` only applies to hub datasets). Example i of the split goes to data-parallel rank
    i % dp_size; resume skips the examples already consumed."""

    section = "huggingface_dataset"

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = _dataset_config("huggingface_dataset", 1024, 8, "no_pad", None)
        config.vision_loss_weight = 0.0
        with config.unlocked():
            config.path = "c4"
            config.name = "en"
            config.split = "train"
            config.streaming = False
        return update_locked(config, updates, "huggingface_dataset")

    def __init__(self, config, tokenizer, processor, host: HostShard | None = None):
        self.config = self.get_default_config(config)
        c = self.config
        self.source = f"huggingface dataset {c.path!r} split {c.split!r}"
        self._dataset = load_hf(c.path, c.name, c.split, c.streaming)
        super().__init__(self.config, tokenizer, processor, host)

    def _records(self):
        return hf_records(self._dataset, self._processor, self.source, self._pos["next_index"], self._pos["epoch"],
                          self.host)

    @property
    def dataset(self):
        return self._dataset


class DatasetFactory:
    """`type` = json | json_vision | huggingface picks a processor and a dataset; each reads its own section."""

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.type = "huggingface"
        config.text_processor = TextProcessor.get_default_config()
        config.huggingface_dataset = HuggingfaceDataset.get_default_config()
        config.json_dataset = JsonDataset.get_default_config()
        config.vision_text_processor = VisionTextProcessor.get_default_config()
        config.json_vision_dataset = JsonVisionDataset.get_default_config()
        return update_locked(config, updates, "train_dataset")

    @classmethod
    def load_dataset(cls, config, tokenizer, host: HostShard | None = None):
        config = cls.get_default_config(config)
        if config.type == "json":
            return JsonDataset(config.json_dataset, tokenizer, TextProcessor(config.text_processor, tokenizer), host)
        if config.type == "json_vision":
            processor = VisionTextProcessor(config.vision_text_processor, tokenizer)
            return JsonVisionDataset(config.json_vision_dataset, tokenizer, processor, host)
        if config.type == "huggingface":
            processor = TextProcessor(config.text_processor, tokenizer)
            return HuggingfaceDataset(config.huggingface_dataset, tokenizer, processor, host)
        raise ValueError(f"unknown dataset type {config.type!r} (field `type`); expected json, json_vision or "
                         "huggingface")

    def __init__(self):
        raise ValueError("DatasetFactory is a static class and should not be instantiated.")
