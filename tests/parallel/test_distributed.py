"""jax.distributed settings from flags and environment."""
import pytest

from lwm.parallel.distributed import DistributedConfig, initialize, resolve


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("LWM_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("LWM_NUM_PROCESSES", "4")
    monkeypatch.setenv("LWM_PROCESS_ID", "3")
    out = resolve(DistributedConfig(process_id=1))
    assert (out.initialize, out.coordinator_address, out.num_processes, out.process_id) == \
        (True, "10.0.0.1:1234", 4, 1)


def test_incomplete_or_bad_settings_raise(monkeypatch):
    for var in ("LWM_COORDINATOR_ADDRESS", "LWM_NUM_PROCESSES", "LWM_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="num_processes, process_id is not"):
        resolve(DistributedConfig(coordinator_address="127.0.0.1:1"))
    with pytest.raises(ValueError, match=r"process_id=2 not in \[0, 2\)"):
        resolve(DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2))
    monkeypatch.setenv("LWM_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="LWM_NUM_PROCESSES='two' is not an integer"):
        resolve(DistributedConfig())


def test_nothing_configured_is_a_no_op(monkeypatch):
    import jax

    for var in ("LWM_COORDINATOR_ADDRESS", "LWM_NUM_PROCESSES", "LWM_PROCESS_ID", "LWM_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert resolve(DistributedConfig()).initialize is False
    initialize(DistributedConfig())
    assert calls == []                                     # nothing configured: jax.distributed untouched
    # Control: configured, it is called once with the resolved settings (recorded, not connected).
    monkeypatch.setenv("LWM_LOCAL_DEVICE_IDS", "0,1")
    initialize(DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1))
    assert calls == [dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1, local_device_ids=[0, 1])]
