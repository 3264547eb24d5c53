"""What a test file needs from outside the package (a browser, a client library): skipped when missing on a
developer's machine, a failure under CI (`CI=true` in the environment, as .ci/run and most CI services set it),
where .ci/run installs everything and a skip would hide a broken install."""
import importlib
import os

import pytest


def under_ci() -> bool:
    """True when the environment says CI (CI=true / 1 / yes, any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> None:
    """Skip the calling test module (locally) or fail it (under CI) with `reason`, one line."""
    if under_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_fail(name: str, install: str):
    """The module `name`; when it cannot be imported, `missing` says so with the `install` hint."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} cannot be imported ({e}); install it: {install}")
