"""`python -m lwm.train_vqgan` and lwm.training.vqgan on a VQGAN smaller than 'tiny' (16 x 16 frames -> 8 x 8 codes
from 64 entries, no attention): the loss falls, dead codes restart (and, in a control, do not), a run killed
after a checkpoint resumes to the same bytes as an uninterrupted one, the checkpoint loads through VQGAN.load,
the PSNR formula on a worked example, a bad flag is one line. Frames: coloured squares on grey, made here."""
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lwm.model.vqgan import VQGAN, VQGANConfig
from lwm.training import vqgan as tv
from support import cpu_subprocess_env

SMALL = dict(resolution=16, hidden_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
             no_attn_mid_block=True, z_channels=16, quantized_embed_dim=16, num_embeddings=64)
SMALL_FLAG = "dict(" + ", ".join(f"{k}={v!r}" for k, v in SMALL.items()) + ")"
COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)], np.uint8)


def squares(n, seed=0, size=16) -> np.ndarray:
    """n uint8 frames (n, size, size, 3): one square of side 4..8 in one of 6 colours on grey 40."""
    rng = np.random.default_rng(seed)
    out = np.full((n, size, size, 3), 40, np.uint8)
    for i in range(n):
        s = rng.integers(4, 9)
        x, y = rng.integers(0, size - s, 2)
        out[i, y:y + s, x:x + s] = COLOURS[i % len(COLOURS)]
    return out


def source(batch=4, seed=0):
    """An in-memory frames source: an endless iterator of (batch, 16, 16, 3) float32 in [-1, 1]."""
    frames = squares(48, seed).astype(np.float32) / 127.5 - 1.0
    k = 0
    while True:
        idx = np.arange(k * batch, (k + 1) * batch) % len(frames)
        yield frames[idx]
        k += 1


def config(out, **updates):
    c = tv.get_default_config()
    c.output_dir, c.vqgan_config, c.update_vqgan_config = str(out), "tiny", SMALL_FLAG
    c.lr, c.log_every, c.save_every, c.total_steps, c.dead_code_steps = 1e-3, 5, 100, 30, 10
    for k, v in updates.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 steps of batch 4 in this process (kmeans++ init, dead codes after 10 steps): the result and its folder."""
    out = tmp_path_factory.mktemp("vq")
    text = io.StringIO()
    result = tv.train_vqgan(config(out), source(), out=text)
    result["printed"] = text.getvalue()
    return result, out


def test_loss_falls_and_psnr_rises(trained):
    result, _ = trained
    rows = result["history"]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["l1"] < rows[0]["l1"] and rows[-1]["l2"] < rows[0]["l2"]
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 2.0, [r["psnr"] for r in rows]
    assert all(0 < r["codebook_used"] <= 1 and 1 <= r["perplexity"] <= 64 for r in rows)
    assert "codebook initialised (kmeans++)" in result["printed"] and "psnr" in result["printed"]


def test_checkpoint_loads_and_encodes(trained):
    """vqgan.msgpack is VQGAN.save's format: VQGAN.load reads it and its codes decode to the squares it learnt
    (better than the random init's decode: a control)."""
    result, out = trained
    vq_config = VQGANConfig.load("tiny").replace(**SMALL)
    frames = squares(8, seed=5).astype(np.float32) / 127.5 - 1.0
    errors = {}
    for name, path in (("trained", result["weights"]), ("random", None)):
        vqgan = VQGAN.load(path, vq_config)
        _, codes = vqgan.encode(frames)
        assert codes.shape == (8, 8, 8) and int(codes.max()) < 64
        errors[name] = float(np.mean((np.asarray(vqgan.decode(codes)) - frames) ** 2))
    assert errors["trained"] < 0.5 * errors["random"], errors
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 30


def test_dead_codes_restart_when_unused(tmp_path):
    """Frames of one flat colour and codebook_init=none (the model's uniform(-1/64, 1/64) codebook): every
    position encodes alike, so few codes are chosen and the rest go unused; with dead_code_steps=2 they are
    restarted from the batch's encoder outputs. Control: the same run with dead_code_steps=5 (more than its 4
    steps) has no dead code and restarts none."""
    flat = lambda: itertools.repeat(np.full((4, 16, 16, 3), 0.5, np.float32))
    runs = {n: tv.train_vqgan(config(tmp_path / str(n), codebook_init="none", dead_code_steps=n, total_steps=4,
                                     log_every=2), flat(), out=io.StringIO()) for n in (2, 5)}
    first = runs[2]["history"][0]
    assert first["codebook_used"] < 0.5, first
    assert runs[2]["restarted"] >= (1 - first["codebook_used"]) * 64 > 0, runs[2]["history"]
    assert runs[5]["restarted"] == 0 and all(r["restarted"] == 0 for r in runs[5]["history"])


def test_restart_dead_codes_rule():
    """The rule on worked examples, with the control where no code is dead (nothing changes)."""
    rng = np.random.default_rng(0)
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    z = np.full((5, 4), -7.0, np.float32)
    last = np.array([5, 1, 5])
    new, dead = tv.restart_dead_codes(emb, last, 5, 3, z, rng)
    assert dead.tolist() == [1] and last.tolist() == [5, 5, 5]
    assert np.array_equal(new[[0, 2]], emb[[0, 2]]) and np.array_equal(new[1], z[0])
    new, dead = tv.restart_dead_codes(emb, np.array([5, 4, 3]), 5, 3, z, rng)      # control: none dead
    assert dead.size == 0 and np.array_equal(new, emb)
    new, dead = tv.restart_dead_codes(emb, np.array([0, 0, 0]), 5, 0, z, rng)      # 0 turns restarts off
    assert dead.size == 0


def test_kmeans_plus_plus_spreads_codes():
    """Two tight clusters of 50 points: k-means++ with k=2 picks one from each (d^2 sampling), in every seed;
    uniform rows land both in one cluster in some seeds (the control)."""
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 0.01, (50, 2)), rng.normal(10, 0.01, (50, 2))])
    side = lambda rows: sorted(int(r[0] > 5) for r in rows)
    assert all(side(tv.kmeans_plus_plus(pts, 2, np.random.default_rng(s))) == [0, 1] for s in range(20))
    assert any(side(tv.random_rows(pts, 2, np.random.default_rng(s))) != [0, 1] for s in range(20))


def test_psnr_worked_example():
    """[-1, 1] pixels, peak-to-peak 2: MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB, the PSNR of the same error in
    [0, 255] pixels (MSE 0.04 * 127.5^2) with peak 255."""
    assert tv.psnr(0.04) == pytest.approx(20.0)
    assert tv.psnr(0.04) == pytest.approx(10 * np.log10(255 ** 2 / (0.04 * 127.5 ** 2)))
    assert tv.psnr(4.0) == pytest.approx(0.0) and tv.psnr(0.0) == float("inf")
    assert tv.usage_stats(np.array([2, 2, 0, 0])) == pytest.approx((0.5, 2.0))


# ------------------------------------------------------------------------------ the command, killed and resumed

# Runs lwm.train_vqgan's CLI and SIGKILLs itself right after the checkpoint of step KILL_AFTER_SAVE is written.
KILLER = r'''
import os, signal, sys
from lwm.training import vqgan
save = vqgan.save_checkpoint
def save_then_die(output_dir, vq_config, state, extra):
    save(output_dir, vq_config, state, extra)
    if extra["step"] == int(os.environ["KILL_AFTER_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)
vqgan.save_checkpoint = save_then_die
from lwm.train_vqgan import cli
sys.exit(cli())
'''


def _run(tmp_path, args, script=None, env=None):
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "lwm.train_vqgan"]
    env = dict(cpu_subprocess_env(str(tmp_path), 1), **(env or {}))
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_COMPILATION_CACHE_DIR", env["JAX_COMPILATION_CACHE_DIR"])
    return subprocess.run(cmd + args, env=env,
                          capture_output=True, text=True, timeout=600)


def test_resume_after_kill_is_bitwise(tmp_path):
    """A folder of PNGs, 8 steps with the patch discriminator on from step 2 and dead-code restarts: run A
    uninterrupted; run B killed right after its step-4 checkpoint, then resumed. B's vqgan.msgpack and
    train_state.msgpack equal A's byte for byte."""
    data = tmp_path / "data"
    data.mkdir()
    for i, frame in enumerate(squares(12, seed=3)):
        Image.fromarray(frame).save(data / f"{i:02d}.png")
    (tmp_path / "killer.py").write_text(KILLER)
    flags = lambda out: [f"--data_dir={data}", f"--output_dir={out}", "--vqgan_config=tiny",
                         f"--update_vqgan_config={SMALL_FLAG}", "--batch_size=4", "--total_steps=8", "--lr=1e-3",
                         "--log_every=2", "--save_every=4", "--dead_code_steps=3", "--disc_weight=0.1",
                         "--disc_start=2", "--seed=7"]
    a = _run(tmp_path, flags(tmp_path / "a"))
    assert a.returncode == 0, a.stderr[-3000:]
    assert "psnr" in a.stdout and "codebook used" in a.stdout and "disc_d" in a.stdout, a.stdout
    killed = _run(tmp_path, flags(tmp_path / "b"), script=tmp_path / "killer.py", env={"KILL_AFTER_SAVE": "4"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert "step 6/8" not in killed.stdout
    again = _run(tmp_path, flags(tmp_path / "b"))                   # without --resume: refused, one line
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--resume=True" in again.stderr
    b = _run(tmp_path, flags(tmp_path / "b") + ["--resume=True"])
    assert b.returncode == 0, b.stderr[-3000:]
    assert "resumed at step 4" in b.stdout and "step 2/8" not in b.stdout and "step 4/8" not in b.stdout
    assert "(total 0)" not in a.stdout.split("step 8/8")[1], a.stdout        # codes were restarted by step 8
    for name in ("vqgan.msgpack", "train_state.msgpack"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.stdout.split("step 6/8")[1].split("s\n")[0].rsplit("|", 1)[0] == \
        b.stdout.split("step 6/8")[1].split("s\n")[0].rsplit("|", 1)[0]      # the same printed figures
    assert (tmp_path / "a" / "vqgan.msgpack").read_bytes() != (tmp_path / "a" / "train_state.msgpack").read_bytes()


@pytest.mark.parametrize("flag, needle", [
    ("--lr=-1", "--lr=-1.0 must be a positive number"),
    ("--codebook_init=kmeans", "--codebook_init='kmeans'"),
    ("--update_vqgan_config=dict(resolution=15)", "--update_vqgan_config: VQGANConfig.resolution=15"),
    ("--vqgan_config=huge", "--vqgan_config='huge'"),
    ("--batch_sise=4", "unknown flag --batch_sise"),
    ("--total_steps=0", "--total_steps=0 must be >= 1"),
])
def test_bad_flag_is_one_line(tmp_path, capsys, flag, needle):
    from lwm import train_vqgan

    (tmp_path / "data").mkdir()
    code = train_vqgan.cli([f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}", flag])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("lwm.train_vqgan: error: ") and needle in err, err
    assert not (tmp_path / "out").exists()                          # nothing written, nothing compiled


def test_empty_data_dir_is_one_line(tmp_path, capsys):
    from lwm import train_vqgan

    (tmp_path / "data").mkdir()
    code = train_vqgan.cli([f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no image or video files" in err, err


def test_folder_frames_images_and_videos(tmp_path):
    """A folder of 2 PNGs (one 32 x 20, centre-cropped) and an MP4 of 10 frames (3 sampled evenly): 5 frames of
    16 x 16; batch k is a pure function of k (what resume relies on), and epochs are reshuffled."""
    from lwm.utils.vision_io import write_video

    Image.fromarray(squares(1, size=16)[0]).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 32, 3), 200, np.uint8)).save(tmp_path / "b.PNG")
    write_video(str(tmp_path / "sub" / "c.mp4"), np.repeat(squares(10, size=16), 1, axis=0), fps=4)
    (tmp_path / "notes.txt").write_text("not media")
    src = tv.FolderFrames(str(tmp_path), 16, batch_size=2, seed=1, frames_per_video=3)
    assert src.frames.shape == (5, 16, 16, 3) and src.files == 3 and src.per_epoch == 2
    assert np.array_equal(src.frames[1], np.full((16, 16, 3), 200, np.uint8))
    first = list(itertools.islice(src(0), 6))
    assert all(b.shape == (2, 16, 16, 3) and b.dtype == np.float32 and -1 <= b.min() <= b.max() <= 1 for b in first)
    assert all(np.array_equal(a, b) for a, b in zip(first[3:], itertools.islice(src(3), 3)))
    epochs = [np.concatenate(first[i:i + 2]) for i in (0, 2, 4)]
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])
