"""What a run actually traced for context parallelism, for tests whose strategy or load balance reaches the model
only through flags (`--update_llama_config`): if the flag were dropped, every run would be the plain ring and
would still equal dense attention, so the losses alone cannot show which strategy ran.

    with traced_strategies() as seen:
        main([... "--update_llama_config=dict(context_parallel_strategy='ulysses', ...)"])
    assert strategies_of(seen) == {("ulysses", "zigzag")} and "zigzag" in layouts_of(seen)

Tracing happens in Python before XLA compiles (and before a persistent-cache lookup), so the record costs nothing
and holds for cached programs too. Recorded: ("ring" | "all_gather" | "ulysses", cfg.load_balance) when a
strategy's per-device function (lwm.attention.context_parallel's ring_local, all_gather_local, ulysses_local)
is traced into a program, and ("layout", balance) for each token order lwm.model.llama.sequence_layout gives
the layers (a context-parallel run also asks for it outside the mesh, e.g. at init, where it is 'none')."""
import contextlib

from lwm.attention import context_parallel
from lwm.model import llama

_LOCALS = {"ring": "ring_local", "all_gather": "all_gather_local", "ulysses": "ulysses_local"}


@contextlib.contextmanager
def traced_strategies():
    """Yields a set that fills with what is traced inside the block (module docstring); restores on exit."""
    seen, saved = set(), {}

    def recording(strategy, real):
        def local(cfg, *args, **kwargs):
            seen.add((strategy, cfg.load_balance))
            return real(cfg, *args, **kwargs)
        return local

    def layout_of(*args, **kwargs):
        balance, sp = saved["sequence_layout"](*args, **kwargs)
        seen.add(("layout", balance))
        return balance, sp

    for strategy, name in _LOCALS.items():
        saved[name] = getattr(context_parallel, name)
        setattr(context_parallel, name, recording(strategy, saved[name]))
    saved["sequence_layout"] = llama.sequence_layout
    llama.sequence_layout = layout_of
    try:
        yield seen
    finally:
        llama.sequence_layout = saved.pop("sequence_layout")
        for name, real in saved.items():
            setattr(context_parallel, name, real)


def strategies_of(seen: set) -> set:
    """The (strategy, balance) entries of a record, without its layouts."""
    return {entry for entry in seen if entry[0] in _LOCALS}


def layouts_of(seen: set) -> set:
    """The balances sequence_layout gave the layers."""
    return {entry[1] for entry in seen if entry[0] == "layout"}
