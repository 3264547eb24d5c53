"""Staged context extension with gates: the library of `python -m lwm.extend --plan=FILE`.

A plan (YAML or JSON, read with yaml.safe_load) lists stages; each stage is one `lwm.train` run (the library,
lwm.training.loop.train) that starts from the previous stage's checkpoint (the first from the plan's base),
then three gates decide whether the next stage may start:
  heldout_loss  the loss on short held-out text minus the previous stage's (the base's for the first stage),
                in nats per token; passes when  increase <= max_increase
  needle        the single-needle eval (lwm.evals.needle through the one runner, lwm.evals.runner) at the
                stage's length; passes when  accuracy >= min_accuracy  (0-1)
  suite         tasks of the long-context suite (lwm.evals.suite) at the stage's length, average score
                (0-100, lwm.evals.report); passes when  score >= min_score
A failed gate stops the run; the report (JSON, and a printed table) names the stage, gate, value and threshold.

    plan = load_plan("docs/plans/tiny_cpu.yaml")           # every field checked; PlanError names file, stage, field
    report = run(plan, workdir="outputs/extend/tiny_cpu")   # {'status': 'passed'|'failed', 'stages': [...], ...}

Resuming: `workdir/state.json` (written aside and renamed, lwm.utils.atomic.replace_file) records each stage's
finished training, its checkpoint and each gate's measured value as soon as it exists. A rerun skips what is
recorded: a finished stage is not trained again; a stage killed mid-training continues through lwm.train's own
--autoresume (its newest checkpoint in workdir/stages/<name>, every `save_every` steps); a killed needle eval
resumes its JSON. Thresholds are applied to the recorded values at every run, so a rerun with a loosened
threshold moves on without measuring again; a changed training field of a stage that already trained is a
PlanError (start a new workdir).

The held-out loss is lwm.train's own eval (the one loss_fn, eval_dataset.*, eval_steps batches) in a run of one
step at learning rate 0 from the checkpoint: AdamW's update is lr * (...) = 0, so the parameters evaluated are
the checkpoint's. For a base without a checkpoint it is the seeded random init that stage 0 starts from.
Data mixes: a stage's `data.mix: [{path: a.jsonl, weight: 3}, {path: b.jsonl, weight: 1}]` (with
`data.mix_examples`, default 0 = the sources' total lines) replaces `json_dataset.path`: the runner writes the
mix once per stage (`write_mix`: each example drawn from a source by weight, seeded by the stage index) to
workdir/stages/<name>.mix.jsonl and trains on it, since lwm.train reads one dataset per run.
Plan fields: docs/context_extension.md ("Staged extension with gates").
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Optional

from ml_collections import ConfigDict

from lwm.cli.flags import FlagError, model_config_from_flags, set_flag
from lwm.cli.values import parse_mesh_dim
from lwm.utils.atomic import replace_file

GATES = ("heldout_loss", "needle", "suite")


class PlanError(ValueError):
    """A plan field the run cannot use; the message is one line naming the file, the stage and the field."""


# ------------------------------------------------------------------------------------------------ the plan

@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    seq_length: int                   # T: tokens per training row, and the length the gates evaluate at
    steps: int
    lr: float
    mesh: str                         # --mesh_dim of the stage's training and evals
    batch_size: int = 1
    warmup_steps: int = 0
    save_every: int = 0               # checkpoint period in steps (0: only at the end)
    rope: dict = dataclasses.field(default_factory=dict)    # --update_llama_config keys, on top of earlier stages'
    data: dict = dataclasses.field(default_factory=dict)    # --train_dataset.<key> flags
    train: dict = dataclasses.field(default_factory=dict)   # any other lwm.train flag
    gates: dict = dataclasses.field(default_factory=dict)   # gate name -> settings (plan-level, then these)


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str
    name: str
    data_dir: str
    base: dict                        # load_llama_config, update_llama_config, load_checkpoint
    tokenizer: str
    stages: tuple
    heldout: dict                     # path, fields, seq_length, batch_size, batches, mesh ('' = each stage's)


_PLAN_KEYS = {"name", "base", "tokenizer", "train", "data", "heldout", "gates", "stages"}
_STAGE_KEYS = {f.name for f in dataclasses.fields(Stage)}
_GATE_DEFAULTS = {
    "heldout_loss": dict(max_increase=None),
    "needle": dict(min_accuracy=None, haystack="", lengths=None, depths=3, rounds=1, max_new_tokens=16,
                   seed=1234, max_tokens_per_batch=2000000),
    "suite": dict(min_score=None, tasks=("niah_single_noise",), lengths=None, depths=(50,), samples=1, seed=0,
                  max_tokens_per_batch=2000000),
}
_THRESHOLD = {"heldout_loss": "max_increase", "needle": "min_accuracy", "suite": "min_score"}
# Flags the runner sets from named stage fields; a stage's `train` or `data` may not set them again.
_OWNED = ("total_steps", "mesh_dim", "load_checkpoint", "autoresume", "update_llama_config", "tokenizer",
          "load_llama_config", "logger.output_dir", "logger.experiment_id", "logger.append_uuid",
          "optimizer.adamw_optimizer.lr", "optimizer.adamw_optimizer.lr_warmup_steps", "save_model_freq")


def _fail(plan_path: str, where: str, field: str, why: str) -> PlanError:
    return PlanError(" ".join(f"plan {plan_path}: {where}field {field}: {why}".split()))


def load_plan(path: str, data_dir: str = "") -> Plan:
    """Read and check a plan file (module docstring). Relative paths in it (tokenizer, data *.path keys,
    heldout.path, needle.haystack, base checkpoint) are taken from `data_dir` (default: the plan's folder).
    Raises PlanError (one line: file, stage, field) for any field the run cannot use, before anything runs;
    FileNotFoundError when the plan file is missing."""
    import yaml

    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise PlanError(f"plan {path}: not YAML or JSON ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"plan {path}: expected a mapping with 'stages', got {type(raw).__name__}")
    data_dir = data_dir or os.path.dirname(os.path.abspath(path))
    fail = lambda where, field, why: _fail(path, where, field, why)
    unknown = sorted(set(raw) - _PLAN_KEYS)
    if unknown:
        raise fail("", unknown[0], f"unknown; known: {', '.join(sorted(_PLAN_KEYS))}")
    resolve = lambda p: p if not p or os.path.isabs(p) or "://" in p else os.path.join(data_dir, p)

    base = _mapping(raw.get("base", {}), fail, "", "base")
    bad = sorted(set(base) - {"load_llama_config", "update_llama_config", "load_checkpoint"})
    if bad:
        raise fail("", f"base.{bad[0]}", "unknown; known: load_llama_config, update_llama_config, load_checkpoint")
    base = dict(load_llama_config=str(base.get("load_llama_config", "")),
                update_llama_config=_mapping(base.get("update_llama_config", {}), fail, "", "base.update_llama_config"),
                load_checkpoint=_checkpoint(str(base.get("load_checkpoint", "") or ""), resolve))
    tokenizer = str(raw.get("tokenizer", "") or "")
    if not tokenizer:
        raise fail("", "tokenizer", "required: a tokenizer.model, a folder or a cached hub id")
    if os.path.exists(resolve(tokenizer)):
        tokenizer = resolve(tokenizer)
    heldout = _heldout(_mapping(raw.get("heldout"), fail, "", "heldout"), fail, resolve)
    shared_train = _mapping(raw.get("train", {}), fail, "", "train")
    shared_data = _mapping(raw.get("data", {}), fail, "", "data")
    shared_gates = _mapping(raw.get("gates", {}), fail, "", "gates")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise fail("", "stages", "required: a non-empty list of stages")
    _check_shared_gates(shared_gates, stages_raw, fail, resolve)
    stages, names = [], set()
    for i, s in enumerate(stages_raw):
        stage = _stage(i, s, fail, shared_train, shared_data, shared_gates, resolve)
        if stage.name in names:
            raise fail(f"stage {i} ({stage.name}): ", "name", "used by an earlier stage")
        names.add(stage.name)
        stages.append(stage)
    plan = Plan(path, str(raw.get("name", "") or os.path.splitext(os.path.basename(path))[0]), data_dir, base,
                tokenizer, tuple(stages), heldout)
    for i, stage in enumerate(plan.stages):          # every flag through lwm.train's own parser and checks
        stage_config(plan, i, "/nonexistent-workdir", check_only=True)
    return plan


def _check_shared_gates(shared: dict, stages_raw: list, fail, resolve) -> None:
    """The plan-level `gates:` on their own, so that an error there names no stage (lengths are bounded by the
    longest stage; a threshold left to the stages is checked with them)."""
    seqs = [s.get("seq_length") for s in stages_raw if isinstance(s, dict)]
    longest = max([n for n in seqs if isinstance(n, int) and not isinstance(n, bool)] or [2 ** 62])
    for gate, settings in shared.items():
        if gate not in GATES:
            raise fail("", f"gates.{gate}", f"unknown gate; known: {', '.join(GATES)}")
        merged = {**_GATE_DEFAULTS[gate], **_mapping(settings or {}, fail, "", f"gates.{gate}")}
        bad = sorted(set(merged) - set(_GATE_DEFAULTS[gate]))
        if bad:
            raise fail("", f"gates.{gate}.{bad[0]}", f"unknown; known: {', '.join(_GATE_DEFAULTS[gate])}")
        if merged[_THRESHOLD[gate]] is not None:
            _gate(gate, merged, longest, fail, "", resolve)


def _mapping(value, fail, where, field) -> dict:
    if value is None:
        raise fail(where, field, "required: a mapping")
    if not isinstance(value, dict):
        raise fail(where, field, f"expected a mapping, got {type(value).__name__}")
    return dict(value)


def _checkpoint(spec: str, resolve) -> str:
    if "::" in spec:
        kind, path = spec.split("::", 1)
        return f"{kind}::{resolve(path)}"
    return spec


def _number(value, fail, where, field, kind=float, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise fail(where, field, f"{value!r} is not {'an integer' if kind is int else 'a number'}")
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = " and ".join(x for x in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "")
                              if x)
        raise fail(where, field, f"{value!r} must be finite{' and ' + bounds if bounds else ''}")
    return kind(value)


def _heldout(h: dict, fail, resolve) -> dict:
    known = {"path", "fields", "seq_length", "batch_size", "batches", "mesh"}
    bad = sorted(set(h) - known)
    if bad:
        raise fail("", f"heldout.{bad[0]}", f"unknown; known: {', '.join(sorted(known))}")
    path = resolve(str(h.get("path", "") or ""))
    if not path:
        raise fail("", "heldout.path", "required: a JSONL of short held-out text")
    if "://" not in path and not os.path.isfile(path):
        raise fail("", "heldout.path", f"{path}: no such file")
    mesh = h.get("mesh") or ""
    if mesh:
        try:
            mesh = parse_mesh_dim("heldout.mesh", str(mesh))
        except FlagError as e:
            raise fail("", "heldout.mesh", str(e)) from None
    return dict(path=path, fields=str(h.get("fields", "text")), mesh=mesh,
                seq_length=_number(h.get("seq_length", 256), fail, "", "heldout.seq_length", int, 1),
                batch_size=_number(h.get("batch_size", 1), fail, "", "heldout.batch_size", int, 1),
                batches=_number(h.get("batches", 2), fail, "", "heldout.batches", int, 1))


def _stage(i, s, fail, shared_train, shared_data, shared_gates, resolve) -> Stage:
    if not isinstance(s, dict):
        raise fail(f"stage {i}: ", "", f"expected a mapping, got {type(s).__name__}")
    where = f"stage {i} ({s.get('name', '?')}): "
    bad = sorted(set(s) - _STAGE_KEYS)
    if bad:
        raise fail(where, bad[0], f"unknown; known: {', '.join(sorted(_STAGE_KEYS))}")
    for key in ("name", "seq_length", "steps", "lr", "mesh"):
        if s.get(key) in (None, ""):
            raise fail(where, key, "required")
    name = str(s["name"])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise fail(where, "name", f"{name!r}: letters, digits, '_', '.', '-' only (it names a folder)")
    seq = _number(s["seq_length"], fail, where, "seq_length", int, 1)
    steps = _number(s["steps"], fail, where, "steps", int, 1)
    warmup = _number(s.get("warmup_steps", 0), fail, where, "warmup_steps", int, 0)
    if warmup >= steps:
        raise fail(where, "warmup_steps", f"{warmup} must be below steps={steps} (the cosine decays after it)")
    try:
        mesh = parse_mesh_dim("mesh", str(s["mesh"]))
    except FlagError as e:
        raise fail(where, "mesh", str(e)) from None
    train = {**shared_train, **_mapping(s.get("train", {}), fail, where, "train")}
    own_data = _mapping(s.get("data", {}), fail, where, "data")
    data = {**shared_data, **own_data}
    if "mix" in own_data and "json_dataset.path" not in own_data:
        data.pop("json_dataset.path", None)         # a stage's own mix replaces the plan's shared path
    if "mix" in data:
        data["mix"] = _mix(data, fail, where, resolve)
    for key in data:
        if key.endswith("path") and isinstance(data[key], str):
            data[key] = resolve(data[key])
            if "://" not in data[key] and not os.path.isfile(data[key]):
                raise fail(where, f"data.{key}", f"{data[key]}: no such file")
    for key in train:
        if key in _OWNED or key.startswith("train_dataset."):
            raise fail(where, f"train.{key}", "set by the plan's own fields (seq_length, steps, lr, mesh, rope, "
                                              "data); give it there")
    gates = {}
    stage_gates = _mapping(s.get("gates", {}), fail, where, "gates")
    for gate in set(shared_gates) | set(stage_gates):
        if gate not in GATES:
            raise fail(where, f"gates.{gate}", f"unknown gate; known: {', '.join(GATES)}")
    for gate in GATES:
        merged = {**_GATE_DEFAULTS[gate], **_mapping(shared_gates.get(gate) or {}, fail, where, f"gates.{gate}"),
                  **_mapping(stage_gates.get(gate) or {}, fail, where, f"gates.{gate}")}
        bad = sorted(set(merged) - set(_GATE_DEFAULTS[gate]))
        if bad:
            raise fail(where, f"gates.{gate}.{bad[0]}", f"unknown; known: {', '.join(_GATE_DEFAULTS[gate])}")
        gates[gate] = _gate(gate, merged, seq, fail, where, resolve)
    return Stage(name=name, seq_length=seq, steps=steps, lr=_number(s["lr"], fail, where, "lr", float, 0.0),
                 mesh=mesh, batch_size=_number(s.get("batch_size", 1), fail, where, "batch_size", int, 1),
                 warmup_steps=warmup, save_every=_number(s.get("save_every", 0), fail, where, "save_every", int, 0),
                 rope=_mapping(s.get("rope", {}), fail, where, "rope"), data=data, train=train, gates=gates)


def _mix(data: dict, fail, where: str, resolve) -> list:
    """The checked `data.mix` of a stage: [{path, weight}, ...] (module docstring, "Data mixes")."""
    mix = data["mix"]
    if data.get("type", "json") != "json" or "json_dataset.path" in data:
        raise fail(where, "data.mix", "a mix replaces json_dataset.path of a json dataset; give one of them")
    if not isinstance(mix, list) or not mix:
        raise fail(where, "data.mix", "expected a non-empty list of {path, weight}")
    out = []
    for j, item in enumerate(mix):
        if not isinstance(item, dict) or set(item) != {"path", "weight"}:
            raise fail(where, f"data.mix[{j}]", "expected exactly the keys path and weight")
        path = resolve(str(item["path"]))
        if not os.path.isfile(path):
            raise fail(where, f"data.mix[{j}].path", f"{path}: no such file")
        weight = item["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 \
                or not math.isfinite(weight):
            raise fail(where, f"data.mix[{j}].weight", f"{weight!r} must be a positive number")
        out.append({"path": path, "weight": float(weight)})
    examples = data.get("mix_examples", 0)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise fail(where, "data.mix_examples", f"{examples!r} must be an integer >= 0 (0: the sources' total)")
    return out


def write_mix(mix: list, path: str, n_examples: int = 0, seed: int = 0) -> dict:
    """Write the JSONL of a data mix: n_examples lines (0: as many as the sources hold in all), each copied
    verbatim from source i with probability weight_i / sum(weights) (numpy's seeded generator), a source
    starting over from its first line when it runs out, so each source's share of the examples is its
    weight's share whatever the sources' sizes (ProLong-style mixes by weight). Written aside and renamed
    (lwm.utils.atomic.replace_file). Sources are streamed (a line count first, then each read in order), so
    their size is not held in memory. Returns {source path: examples taken}. Raises PlanError for an empty
    source."""
    import contextlib

    import numpy as np

    def lines_of(source: str):
        """The non-blank lines of a source, newline-ended, starting over at its end (streamed, never held)."""
        while True:
            with open(source, "rb") as f:
                for line in f:
                    if line.strip():
                        yield line if line.endswith(b"\n") else line + b"\n"

    counts = []
    for item in mix:                                   # one streaming pass per source: its line count
        with open(item["path"], "rb") as f:
            counts.append(sum(1 for line in f if line.strip()))
        if not counts[-1]:
            raise PlanError(f"{item['path']}: a data.mix source with no lines")
    n = n_examples or sum(counts)
    weights = np.asarray([item["weight"] for item in mix], np.float64)
    picks = np.random.default_rng(seed).choice(len(mix), size=n, p=weights / weights.sum())
    taken = [0] * len(mix)
    with contextlib.ExitStack() as stack, replace_file(path) as tmp, open(tmp, "wb") as f:
        readers = [stack.enter_context(contextlib.closing(lines_of(item["path"]))) for item in mix]
        for i in picks:
            f.write(next(readers[i]))
            taken[i] += 1
    return {item["path"]: k for item, k in zip(mix, taken)}


def _gate(gate: str, g: dict, seq: int, fail, where: str, resolve) -> dict:
    field = lambda k: f"gates.{gate}.{k}"
    t = _THRESHOLD[gate]
    if g[t] is None:
        raise fail(where, field(t), "required: the gate's threshold")
    hi = {"needle": 1.0, "suite": 100.0}.get(gate)
    g[t] = _number(g[t], fail, where, field(t), float, None if gate == "heldout_loss" else 0.0, hi)
    if gate == "heldout_loss":
        return g
    g["max_new_tokens"] = _number(g.get("max_new_tokens", 32), fail, where, field("max_new_tokens"), int, 1)
    g["samples" if gate == "suite" else "rounds"] = _number(g["samples" if gate == "suite" else "rounds"], fail,
                                                             where, field("samples" if gate == "suite" else "rounds"),
                                                             int, 1)
    g["max_tokens_per_batch"] = _number(g["max_tokens_per_batch"], fail, where, field("max_tokens_per_batch"), int, 1)
    g["seed"] = _number(g["seed"], fail, where, field("seed"), int)
    if g["lengths"] is not None:
        if not isinstance(g["lengths"], list) or not g["lengths"]:
            raise fail(where, field("lengths"), "a non-empty list of token lengths")
        g["lengths"] = [_number(n, fail, where, field("lengths"), int, 1, seq) for n in g["lengths"]]
    if gate == "needle":
        g["depths"] = _number(g["depths"], fail, where, field("depths"), int, 1)
        g["haystack"] = resolve(str(g["haystack"] or ""))
        if not g["haystack"]:
            raise fail(where, field("haystack"), "required: a JSONL with a \"text\" field per line")
        if "://" not in g["haystack"] and not os.path.isfile(g["haystack"]):
            raise fail(where, field("haystack"), f"{g['haystack']}: no such file")
    else:
        from lwm.evals import suite

        tasks = g["tasks"]
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        try:
            selected = suite.select_tasks(",".join(tasks))
        except ValueError as e:
            raise fail(where, field("tasks"), str(e).replace("--tasks: ", "")) from None
        essay = [t.name for t in selected if t.needs_essay]
        if essay:
            raise fail(where, field("tasks"), f"{', '.join(essay)} need an essay haystack; the gate runs the "
                                              "tasks with their own haystacks (noise, needles, words)")
        g["tasks"] = [t.name for t in selected]
        g["depths"] = [_number(d, fail, where, field("depths"), float, 0.0, 100.0) for d in
                       (g["depths"] if isinstance(g["depths"], (list, tuple)) else [g["depths"]])]
    return g


# ------------------------------------------------------------------------------------- lwm.train configs

def _model_updates(plan: Plan, i: int) -> dict:
    """The stage's --update_llama_config: the base's, every RoPE change of stages 0..i (later ones win), and
    max_sequence_length = the stage's length (unless a rope block sets it)."""
    updates = dict(plan.base["update_llama_config"])
    for stage in plan.stages[:i + 1]:
        updates.update(stage.rope)
    if "max_sequence_length" not in plan.stages[i].rope:
        updates["max_sequence_length"] = plan.stages[i].seq_length
    return updates


def _dataset_section(data: dict) -> str:
    kind = str(data.get("type", "json"))
    return {"json": "json_dataset", "json_vision": "json_vision_dataset"}.get(kind, "huggingface_dataset")


def _apply(config: ConfigDict, flags: list, fail) -> None:
    """set_flag for each (plan field, flag, value); a refused value is a PlanError naming the plan field."""
    for field, name, value in flags:
        if isinstance(value, bool):
            text = str(value)
        elif isinstance(value, (dict, list, tuple)):
            text = json.dumps(value)
        else:
            text = value
        try:
            set_flag(config, name, text)
        except (FlagError, ValueError, TypeError) as e:
            raise fail(field, str(e)) from None


def stage_flags(plan: Plan, i: int, init: str) -> list:
    """(plan field, lwm.train flag, value) of stage i's training run, starting from checkpoint spec `init`."""
    stage = plan.stages[i]
    section = _dataset_section(stage.data)
    flags = [("train." + k, k, v) for k, v in stage.train.items()]
    flags += [("data." + k, "train_dataset." + k, v) for k, v in stage.data.items()
              if k not in ("mix", "mix_examples")]
    flags += [("seq_length", f"train_dataset.{section}.seq_length", stage.seq_length),
              ("batch_size", f"train_dataset.{section}.batch_size", stage.batch_size),
              ("steps", "total_steps", stage.steps), ("mesh", "mesh_dim", stage.mesh),
              ("lr", "optimizer.adamw_optimizer.lr", stage.lr),
              ("warmup_steps", "optimizer.adamw_optimizer.lr_warmup_steps", stage.warmup_steps),
              ("base.load_llama_config", "load_llama_config", plan.base["load_llama_config"]),
              ("rope", "update_llama_config", _model_updates(plan, i)),
              ("tokenizer", "tokenizer", plan.tokenizer), ("base.load_checkpoint", "load_checkpoint", init)]
    if "optimizer.adamw_optimizer.lr_decay_steps" not in stage.train:
        flags.append(("steps", "optimizer.adamw_optimizer.lr_decay_steps", stage.steps))
    if "optimizer.adamw_optimizer.end_lr" not in stage.train:
        flags.append(("lr", "optimizer.adamw_optimizer.end_lr", stage.lr / 10))
    return flags


def stage_config(plan: Plan, i: int, workdir: str, init: Optional[str] = None, check_only: bool = False):
    """The lwm.train ConfigDict of stage i: its checkpoints and metrics under workdir/stages/<name>, autoresume
    on. check_only: parse and check every flag and the model config (lwm.training.loop.check_config,
    model_config_from_flags), raising PlanError naming the stage's field; nothing is read or run."""
    from lwm.training.flags import get_default_config
    from lwm.training.loop import check_config

    stage = plan.stages[i]
    where = f"stage {i} ({stage.name}): "
    fail = lambda field, why: _fail(plan.path, where, field, why)
    if init is None:      # checking: stage 0 reads the base (its file checked); later ones the stage before's
        init = plan.base["load_checkpoint"] if i == 0 else ""
    config = get_default_config()
    save_every = stage.save_every or stage.steps
    _apply(config, [("train.checkpointer.save_optimizer_state", "checkpointer.save_optimizer_state", True),
                    ("save_every", "save_model_freq", save_every)], fail)
    _apply(config, stage_flags(plan, i, init), fail)
    if "mix" in stage.data:               # the mix, written once per stage folder (check_only: not written)
        mix_path = os.path.join(workdir, "stages", f"{stage.name}.mix.jsonl")
        if not check_only and not os.path.isfile(mix_path):
            os.makedirs(os.path.dirname(mix_path), exist_ok=True)
            taken = write_mix(stage.data["mix"], mix_path, stage.data.get("mix_examples", 0), seed=i)
            print(f"lwm.extend: stage {stage.name}: data mix {mix_path}: "
                  + ", ".join(f"{os.path.basename(p)} {k}" for p, k in taken.items()), flush=True)
        _apply(config, [("data.mix", "train_dataset.json_dataset.path", mix_path)], fail)
    _apply(config, [("name", "logger.output_dir", os.path.join(workdir, "stages")),
                    ("name", "logger.experiment_id", stage.name), ("name", "logger.append_uuid", False),
                    ("name", "autoresume", True)], fail)
    if check_only:
        try:
            check_config(config)
        except (FlagError, ValueError) as e:
            raise fail("train", str(e)) from None
        try:
            model = model_config_from_flags(config)
        except (FlagError, ValueError, TypeError) as e:
            raise fail("rope", str(e)) from None
        if stage.seq_length > model.max_sequence_length:
            raise fail("seq_length", f"{stage.seq_length} exceeds the model's max_sequence_length="
                                     f"{model.max_sequence_length} (set it in rope)")
        if plan.heldout["seq_length"] > model.max_sequence_length:
            raise fail("rope", f"max_sequence_length={model.max_sequence_length} is below heldout.seq_length="
                               f"{plan.heldout['seq_length']}")
        for gate in ("needle", "suite"):
            lengths = eval_lengths(stage, gate, model)
            if min(lengths) < 256:
                raise fail(f"gates.{gate}.lengths", f"{lengths}: the stage is too short to leave room for the "
                                                    "prompt's template and the answer (give lengths >= 256)")
    return config


def heldout_config(plan: Plan, i: Optional[int], workdir: str, checkpoint: str):
    """lwm.train config of one step at learning rate 0 that logs the eval loss of `checkpoint` (stage i's
    model config; i None: the base's, '' checkpoint: the seeded init) on plan.heldout (module docstring)."""
    from lwm.training.flags import get_default_config

    h = plan.heldout
    name = "base" if i is None else plan.stages[i].name
    stage = plan.stages[0 if i is None else i]
    fail = lambda field, why: _fail(plan.path, f"heldout of {name}: ", field, why)
    updates = dict(plan.base["update_llama_config"]) if i is None else _model_updates(plan, i)
    updates.setdefault("max_sequence_length", max(h["seq_length"], stage.seq_length))
    config = get_default_config()
    flags = [("train." + k, k, v) for k, v in stage.train.items() if not k.startswith("optimizer.")]
    for group in ("train_dataset", "eval_dataset"):
        flags += [(f"heldout.{k}", f"{group}.{k}", v) for k, v in
                  (("type", "json"), ("text_processor.fields", h["fields"]), ("json_dataset.path", h["path"]),
                   ("json_dataset.seq_length", h["seq_length"]), ("json_dataset.batch_size", h["batch_size"]),
                   ("json_dataset.mode", "pack"))]
    for k in ("lr", "init_lr", "end_lr", "weight_decay", "lr_warmup_steps"):
        flags.append(("heldout", f"optimizer.adamw_optimizer.{k}", 0))
    flags += [("heldout", "optimizer.adamw_optimizer.lr_decay_steps", 1), ("heldout", "total_steps", 1),
              ("heldout", "log_freq", 1), ("heldout.batches", "eval_steps", h["batches"]),
              ("heldout.mesh", "mesh_dim", h["mesh"] or stage.mesh), ("tokenizer", "tokenizer", plan.tokenizer),
              ("base.load_llama_config", "load_llama_config", plan.base["load_llama_config"]),
              ("rope", "update_llama_config", updates), ("heldout", "load_checkpoint", checkpoint),
              ("heldout", "save_model_freq", 0), ("heldout", "logger.output_dir", os.path.join(workdir, "heldout")),
              ("heldout", "logger.experiment_id", name), ("heldout", "logger.append_uuid", False)]
    _apply(config, flags, fail)
    return config


# --------------------------------------------------------------------------------------------- the gates

def eval_lengths(stage: Stage, gate: str, model_config) -> list[int]:
    """The gate's token lengths: its `lengths`, else the stage's length less room for the answer and the
    prompt's padding to the attention block (lwm.inference.sampling.bucket_length)."""
    g = stage.gates[gate]
    if g["lengths"]:
        return list(g["lengths"])
    block = max(model_config.scan_query_chunk_size, model_config.scan_key_chunk_size)
    return [stage.seq_length - block - g["max_new_tokens"] - 16]


def heldout_loss(config) -> float:
    """The eval loss (nats per target token) logged by lwm.train's step-0 row of a `heldout_config` run."""
    from lwm.training.loop import train

    row = train(config)["last_row"]
    return float(row["eval_loss"])


def eval_backend(plan: Plan, i: int, checkpoint: str):
    """The JAX backend (lwm.evals.backends.JaxBackend, the one runtime set-up) of stage i's checkpoint."""
    from lwm.evals.backends import JaxBackend
    from lwm.inference import runtime

    flags = runtime.runtime_flags(ConfigDict(), tokenizer=plan.tokenizer)
    stage = plan.stages[i]
    flags.mesh_dim = stage.mesh
    flags.dtype = str(stage.train.get("dtype", "fp32"))
    flags.load_llama_config = plan.base["load_llama_config"]
    flags.update_llama_config = json.dumps(_model_updates(plan, i))
    flags.load_checkpoint = checkpoint
    return JaxBackend.from_flags(flags, modality="text")


def needle_gate(backend, stage: Stage, out_path: str) -> dict:
    """Single-needle accuracy (0-1) at the gate's lengths; results saved to out_path after every batch and
    resumed from it (lwm.evals.needle_run's protocol)."""
    import random

    from lwm.evals import needle, report, runner

    g = stage.gates["needle"]
    lengths = eval_lengths(stage, "needle", backend.config)
    depths = needle.depth_percents(g["depths"])
    results = report.load_results(out_path)
    done = frozenset((r["context_length"], r["depth_percent"], r["seed"]) for r in results)
    haystacks = needle.read_haystacks(g["haystack"], g["rounds"], max(lengths), backend.tokenizer)
    trials = needle.single_needle_trials(haystacks, backend.tokenizer, lengths, depths, random.Random(g["seed"]),
                                         done=done)
    task = dataclasses.replace(needle.SINGLE, max_new_tokens=g["max_new_tokens"])
    results = runner.run(trials, backend, task, max_tokens_per_batch=g["max_tokens_per_batch"], results=results,
                         on_batch=lambda rs: report.write_json(out_path, list(rs)), progress=False,
                         desc="needle gate")
    report.write_json(out_path, list(results))
    return dict(value=report.mean_accuracy(results), lengths=lengths, trials=len(results), results=out_path)


def suite_gate(backend, stage: Stage, out_dir: str) -> dict:
    """Average score (0-100) of the gate's suite tasks at its lengths (lwm.evals.suite samples, the one runner,
    the one report's results.json under out_dir)."""
    from lwm.evals import report, runner, suite

    g = stage.gates["suite"]
    lengths = eval_lengths(stage, "suite", backend.config)
    tasks = suite.select_tasks(",".join(g["tasks"]))
    samples = suite.build_samples(tasks, backend.tokenizer, lengths, g["depths"], g["samples"], g["seed"])
    records = runner.run(samples, backend, {t.name: t for t in tasks}, max_tokens_per_batch=g["max_tokens_per_batch"],
                         progress=False, desc="suite gate")
    summary = report.write_results(out_dir, records, dict(tasks=g["tasks"], lengths=lengths, stage=stage.name),
                                   threshold=g["min_score"], plots=False)
    value = float(sum(summary["average"].values()) / len(summary["average"]))
    return dict(value=value, lengths=lengths, tasks=g["tasks"], prompts=len(records),
                results=os.path.join(out_dir, "results.json"))


def decide(stage: Stage, gate: str, measured: dict) -> dict:
    """A gate's row of the report: value, threshold, rule and whether it passed."""
    t = stage.gates[gate][_THRESHOLD[gate]]
    v = measured["value"]
    passed = v <= t if gate == "heldout_loss" else v >= t
    rule = {"heldout_loss": "increase <= max_increase", "needle": "accuracy >= min_accuracy",
            "suite": "score >= min_score"}[gate]
    return dict(gate=gate, value=v, threshold=t, rule=rule, passed=bool(passed),
                **{k: x for k, x in measured.items() if k != "value"})


# ------------------------------------------------------------------------------------------ state, report

def read_state(workdir: str) -> dict:
    path = os.path.join(workdir, "state.json")
    if not os.path.exists(path):
        return {"stages": {}}
    with open(path) as f:
        return json.load(f)


def write_state(workdir: str, state: dict) -> None:
    """state.json, written aside and renamed (a kill leaves the old file or the new one, whole)."""
    with replace_file(os.path.join(workdir, "state.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)


def _recorded(flags: list) -> dict:
    """{flag: value} of a stage's training run as state.json records it (JSON values)."""
    return json.loads(json.dumps({n: v for _, n, v in flags}, sort_keys=True, default=str))


def report_table(report: dict) -> str:
    """The printed table: one row per (stage, gate)."""
    lines = ["| stage | length | gate | value | threshold | rule | result |", "|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        for g in s["gates"]:
            value = f"{g['value']:+.4f}" if g["gate"] == "heldout_loss" else f"{g['value']:.4g}"
            extra = f" (loss {g['loss']:.4f} vs {g['previous_loss']:.4f})" if g["gate"] == "heldout_loss" else ""
            lines.append(f"| {s['name']} | {s['seq_length']} | {g['gate']} | {value}{extra} | {g['threshold']:g} | "
                         f"{g['rule']} | {'pass' if g['passed'] else '**FAIL**'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- run

def run(plan: Plan, workdir: str, report_path: str = "", log=print) -> dict:
    """Run (or resume) the plan's stages and gates under `workdir` (module docstring). Returns the report
    (also written to report_path, default workdir/report.json): status 'passed' or 'failed', and per stage
    its checkpoint and gate rows. A failed gate stops the run (status 'failed', `failed` names stage, gate,
    value and threshold). Raises PlanError when a stage that already trained has changed in the plan."""
    from lwm.checkpoint.manager import checkpoint_spec, latest
    from lwm.training.loop import train

    workdir = os.path.abspath(workdir)
    report_path = report_path or os.path.join(workdir, "report.json")
    os.makedirs(workdir, exist_ok=True)
    state = read_state(workdir)
    save = lambda: write_state(workdir, state)
    report = dict(plan=plan.path, name=plan.name, workdir=workdir, status="running", stages=[])
    previous_loss = state.get("base_heldout_loss")
    if previous_loss is None:
        log(f"extend: held-out loss of the base ({plan.base['load_checkpoint'] or 'seeded random init'})")
        previous_loss = state["base_heldout_loss"] = heldout_loss(
            heldout_config(plan, None, workdir, plan.base["load_checkpoint"]))
        save()
    init = plan.base["load_checkpoint"]
    for i, stage in enumerate(plan.stages):
        flags = stage_flags(plan, i, init)
        rec = state["stages"].setdefault(stage.name, {})
        now, then = _recorded(flags), rec.setdefault("flags", _recorded(flags))
        changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if changed:
            field = next(f for f, n, _ in flags if n == changed[0]) if changed[0] in now else changed[0]
            raise PlanError(f"plan {plan.path}: stage {i} ({stage.name}): field {field}: --{changed[0]} is "
                            f"{now.get(changed[0])!r}, but the stage ran in {workdir} with {then.get(changed[0])!r}; "
                            "restore it or use a new workdir")
        save()
        if not rec.get("checkpoint"):
            log(f"extend: stage {i} ({stage.name}): training {stage.steps} steps at {stage.seq_length} tokens "
                f"from {init or 'random init'}")
            summary = train(stage_config(plan, i, workdir, init))
            folder = latest(summary["output_dir"])
            if folder is None:
                raise RuntimeError(f"stage {stage.name}: lwm.train saved no checkpoint in {summary['output_dir']}")
            spec = checkpoint_spec(folder)
            rec["checkpoint"] = spec.replace("trainstate::", "trainstate_params::", 1)   # parameters, fresh optimizer
            rec["step"] = summary["step"]
            save()
        else:
            log(f"extend: stage {i} ({stage.name}): trained earlier ({rec['checkpoint']}); not trained again")
        checkpoint = rec["checkpoint"]
        measured = rec.setdefault("gates", {})
        if "heldout_loss" not in measured:
            loss = heldout_loss(heldout_config(plan, i, workdir, checkpoint))
            measured["heldout_loss"] = dict(value=loss - previous_loss, loss=loss, previous_loss=previous_loss)
            save()
        backend = None
        for gate, fn, out in (("needle", needle_gate, os.path.join(workdir, "gates", stage.name, "needle.json")),
                              ("suite", suite_gate, os.path.join(workdir, "gates", stage.name, "suite"))):
            if gate not in measured:
                log(f"extend: stage {i} ({stage.name}): gate {gate}")
                backend = backend or eval_backend(plan, i, checkpoint)
                measured[gate] = fn(backend, stage, out)
                save()
        del backend
        rows = [decide(stage, g, measured[g]) for g in GATES]
        report["stages"].append(dict(name=stage.name, seq_length=stage.seq_length, checkpoint=checkpoint,
                                     step=rec.get("step"), gates=rows))
        failed = [r for r in rows if not r["passed"]]
        if failed:
            f = failed[0]
            report.update(status="failed", failed=dict(stage=stage.name, gate=f["gate"], value=f["value"],
                                                      threshold=f["threshold"], rule=f["rule"]))
            break
        previous_loss, init = measured["heldout_loss"]["loss"], checkpoint
    else:
        report["status"] = "passed"
    with replace_file(report_path) as tmp:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
    report["report"] = report_path
    return report
