"""Defaults as locked ConfigDicts, updated from a (nested) dict where an unknown key fails loudly.

    config = ConfigDict({"lr": 0.01, "adamw": {"b1": 0.9}})
    update_locked(config, {"adamw": {"b1": 0.8}}, "train")     # config.adamw.b1 == 0.8
    update_locked(config, {"adamw": {"b3": 0.8}}, "train")     # KeyError: unknown config field train.adamw.b3
"""
from __future__ import annotations

from ml_collections import ConfigDict


def update_locked(config: ConfigDict, updates, where: str, noun: str = "config field") -> ConfigDict:
    """Lock `config` (no new keys), then apply `updates` (a dict or ConfigDict, None for none), section by
    section. An unknown key raises KeyError naming `where.key` (as an unknown `noun`) and the known keys."""
    config.lock()
    if updates is not None:
        updates = updates.to_dict() if isinstance(updates, ConfigDict) else dict(updates)
        for key, value in updates.items():
            if key not in config:
                raise KeyError(f"unknown {noun} {where}.{key}; known: {sorted(config.keys())}")
            if isinstance(config[key], ConfigDict):
                update_locked(config[key], value, f"{where}.{key}", noun)
            else:
                config[key] = value
    return config
