"""`python -m lwm.memory` answering the hardware question: the search finds the fewest devices that fit, and
a smaller device needs more of them (the control); lengths with K/M, devices by name or size with a unit, a
bare number refused, the batch-size message naming the flag, and the --help text whole."""
import pytest

from lwm import memory
from lwm.cli.command import cli
from lwm.cli.values import FlagError, parse_length_list, parse_size
from lwm.model.llama import LLaMAConfig
from lwm.tools.memory_planner import DEVICES, Plan, estimate, meshes, search


def test_values_lengths_and_sizes():
    assert parse_length_list("seq_len", "128K,1M,4096") == [131072, 1048576, 4096]
    assert parse_size("device_memory", "80GiB") == 80 * 2**30
    assert parse_size("device_memory", "95GB") == 95e9
    assert parse_size("device_memory", "H100", DEVICES) == DEVICES["h100"]
    for bad in ("80", "lots", "-3GB"):
        with pytest.raises(FlagError, match="--device_memory="):
            parse_size("device_memory", bad, DEVICES)
    with pytest.raises(FlagError, match="a bare number has no unit"):
        parse_size("device_memory", "80")
    with pytest.raises(FlagError, match="--seq_len='12x'"):
        parse_length_list("seq_len", "12x")


def test_meshes_cover_every_factorisation():
    got = list(meshes(8, batch_size=2))
    assert all(a * b * c * d == 8 for a, b, c, d in got) and len(set(got)) == len(got)
    assert all(2 % (a * b) == 0 for a, b, _, _ in got)         # dp * fsdp divides the batch
    assert len(list(meshes(8, batch_size=8))) == 20            # compositions of 2^3 into 4 parts: C(6,3)


def test_search_smallest_count_and_a_smaller_device_needs_more():
    c = LLaMAConfig.load("7b")
    big = search(c, 131072, DEVICES["h200"], "train")
    small = search(c, 131072, DEVICES["tpu-v4"], "train")
    assert big and small and small[0].devices > big[0].devices          # the control: the answer changes
    for fits, size in ((big, DEVICES["h200"]), (small, DEVICES["tpu-v4"])):
        best = fits[0]
        assert estimate(best.plan)["train"]["total"] == best.per_device <= size
        # the fewest: nothing at half the devices fits (any mesh, strategy, remat)
        assert not any(estimate(Plan(cfg, 131072, m, 1, 2, s))["train"]["total"] <= size
                       for m in meshes(best.devices // 2, 1) if best.devices > 1
                       for s in ("ring", "all_gather")
                       for cfg in (c.replace(remat_block=r) for r in ("", "nothing_saveable", "checkpoint_dots"))
                       if m[2] <= 32)
    # inference: the 1M cache alone (512 GiB in bf16) needs more than one 141 GiB device
    inf = search(c, 2**20, DEVICES["h200"], "inference")
    assert inf[0].devices * DEVICES["h200"] >= estimate(inf[0].plan)["inference"]["kv_cache"] * inf[0].devices
    assert inf[0].devices >= 4
    assert search(c, 2**20, 1e6, "train", max_devices=64) == []         # 1 MB per device: none


def test_the_answer_prints_flags_that_parse(capsys):
    memory.main(["--llama_config=7b", "--seq_len=128K", "--device_memory=h100,95GB"])
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| 131072 |")]
    assert len(rows) == 4 and "| h100 | train |" in rows[0] and "| 95GB | inference |" in rows[3]
    assert "--mesh_dim=" in rows[0] and "remat_block=" in rows[0]
    assert "NVIDIA H100" in out                                          # the device table's source
    flags = rows[0].split("`")[1]
    mesh = flags.split("--mesh_dim=")[1].split()[0]
    # the table mode agrees with the search's figure for that mesh
    remat = flags.split("remat_block='")[1].split("'")[0]
    memory.main(["--llama_config=7b", "--seq_len=128K", f"--mesh_dim={mesh}", f"--remat_block={remat}"])
    table = capsys.readouterr().out
    train_row = [l for l in table.splitlines() if l.startswith("| 131072 | train |")][0]
    assert f"{float(train_row.split('|')[-2]):.1f}" == rows[0].split("|")[8].strip()


def test_refusals_are_one_line(capsys):
    run = lambda *argv: cli("lwm.memory", memory.main, memory.get_default_config, memory.__doc__, list(argv))
    assert run("--llama_config=tiny", "--device_memory=80") == 2
    assert "a bare number has no unit" in capsys.readouterr().err
    assert run("--llama_config=tiny", "--mesh_dim=1,8,1,1") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "raise --batch_size to a multiple of 8 (--batch_size=8)" in err
    assert run("--llama_config=tiny", "--mesh_dim=1,8,1,1", "--batch_size=8", "--seq_len=1K") == 0   # control
    capsys.readouterr()
    assert run("--llama_config=tiny") == 0                 # neither mesh nor device: one device's table, and how to ask
    out = capsys.readouterr().out
    assert "mesh dp,fsdp,tp,sp = 1,1,1,1" in out and "--device_memory=h100 (or a size, 80GiB) finds" in out
    assert run("--llama_config=tiny", "--mesh_dim=1,1,1,2", "--device_memory=h100,h200") == 2
    assert "one device with --mesh_dim" in capsys.readouterr().err


def test_help_is_whole_and_the_default_remat_is_explained(capsys):
    assert cli("lwm.memory", memory.main, memory.get_default_config, memory.__doc__, ["--help"]) == 0
    text = capsys.readouterr().out
    assert "--remat_block=nothing_saveable\n" in text          # the example line is not run into the next
    assert "a bare number is refused" in text
    memory.main(["--llama_config=7b", "--seq_len=128K", "--mesh_dim=1,1,1,8"])
    out = capsys.readouterr().out
    assert "remat '' (the config's default)" in out and "--remat_block=nothing_saveable" in out
    memory.main(["--llama_config=7b", "--seq_len=128K", "--mesh_dim=1,1,1,8", "--remat_block=nothing_saveable"])
    assert "the config's default" not in capsys.readouterr().out       # control: no note when remat is set


def test_docs_figures_are_what_the_planner_prints(capsys):
    """docs/memory.md's answer for LWM-7B and docs/context_extension.md's stage figure are today's output of
    the commands printed beside them (a changed estimate fails here until the docs are rerun)."""
    import os
    import re
    import shlex

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    doc = open(os.path.join(root, "docs", "memory.md")).read()
    section = doc[doc.index("## LWM-7B at 128K and 1M"):]
    command = re.search(r"`python -m lwm.memory ([^`]*)`", section).group(1)
    block = section.split("```\n", 2)[1].strip().splitlines()
    memory.main(shlex.split(command))
    out = capsys.readouterr().out.strip().splitlines()
    # every row and device line as printed today; the first line lists the strategies searched, which grows
    # with lwm.attention's list (a new strategy that wins changes a row, and fails here)
    assert out[1:] == block[1:] and len(out) == len(block) == 23
    ext = open(os.path.join(root, "docs", "context_extension.md")).read()
    rows = re.findall(r"^\| \d \| (\d+) \([^|]*\|[^|]*\|[^|]*\| (\d+) \| ([\d,]+) \| ([\d.]+) \|$", ext, re.M)
    assert len(rows) == 5
    for seq, batch, mesh, gib in rows:
        memory.main(["--llama_config=7b", f"--seq_len={seq}", f"--mesh_dim={mesh}", f"--batch_size={batch}",
                     "--dtype=bf16", "--remat_block=nothing_saveable"])
        train = [l for l in capsys.readouterr().out.splitlines() if "| train |" in l][0]
        assert train.split("|")[-2].strip() == gib


def test_ulysses_ring_is_searched_with_its_group_size():
    from lwm.tools.memory_planner import SP_STRATEGIES

    if "ulysses_ring" not in SP_STRATEGIES:
        pytest.skip("lwm.attention has no 'ulysses_ring' strategy")
    c = LLaMAConfig.load("7b")
    fits = search(c, 2**20, DEVICES["h100"], "train", strategies=("ulysses_ring",))
    assert fits and all(f.plan.sp_strategy == "ulysses_ring" for f in fits)
    u = fits[0].plan.config.context_parallel_ulysses_size
    assert 1 < u < fits[0].plan.mesh[3] and f"context_parallel_ulysses_size={u}" in fits[0].flags()
