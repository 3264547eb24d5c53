"""Training a VQGAN (`python -m lwm.train_vqgan`): the library. Frames in [-1, 1] -> a VQGAN checkpoint that
`--vqgan_checkpoint` reads (VQGAN.save's msgpack).

    config = get_default_config(); config.output_dir = "/runs/vq"; config.vqgan_config = "tiny"
    result = train_vqgan(config, frames_source)   # frames_source: FolderFrames(...) or any iterator of batches

`frames_source` is a Python iterator (or iterable) of float arrays (N, R, R, 3) in [-1, 1], one training
batch each (R = VQGANConfig.resolution), or a callable `start -> iterator` that begins at batch `start` (what
a resumed run asks for; a plain iterator is fast-forwarded instead, so it must replay the same batches from
its start). `FolderFrames` is the source of the command: images and videos of a folder.

Loss per step (all means over elements; B batch, H/W pixels, h/w code grid, E code dimension, V codebook):
  l1 + l2 + codebook + beta * commitment [+ disc_weight * generator]
  l1 = mean |x_hat - x|, l2 = mean (x_hat - x)^2 on the unclipped reconstruction; codebook = mean ||sg(z) - e||^2,
  commitment = mean ||z - sg(e)||^2 with beta = VQGANConfig.commitment_cost (0.25, the original's; van den Oord
  et al. 2017, eq. 3). The optional patch discriminator (`PatchDiscriminator`, Isola et al. 2017's PatchGAN,
  off unless --disc_weight > 0) is trained with the hinge loss mean relu(1 - D(x)) + mean relu(1 + D(x_hat))
  and gives the generator -mean D(x_hat) with a FIXED weight disc_weight from step disc_start on (no adaptive
  weight: taming-transformers' last-layer gradient ratio is not used).
Optimizer: optax.adam(lr, b1=0.5, b2=0.9) (taming-transformers' betas), one for the VQGAN, one for the
discriminator.
Codebook health: at step 0 the codebook is initialised from encoder outputs of the first batches
(--codebook_init: 'kmeans++' seeding (Arthur & Vassilvitskii 2007) or 'random' rows; 'none' keeps the
model's uniform(-1/V, 1/V) init); after every step a code not chosen in the last --dead_code_steps steps is
re-initialised from a random encoder output of that step's batch (`restart_dead_codes`).
Printed every --log_every steps: the loss terms, PSNR = 10 log10(4 / MSE) dB on the batch (`psnr`), the
fraction of the V codes used in the window and their perplexity exp(-sum p log p), the codes restarted.

Output folder: vqgan.msgpack (the weights, VQGAN.load reads them), train_state.msgpack (everything a resume
needs: parameters, optimizer states, step, data position, codebook-usage counters; the seed is a flag and
every random draw is keyed by (seed, step)), both replaced atomically (lwm.utils.atomic.replace_file; the
state first, and a resume reads only the state), and metrics.jsonl (one row per log line). A resumed run
gives the bytes an uninterrupted one gives.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from lwm.cli.values import FlagError, parse_literal_dict
from lwm.model.vqgan import VQGAN, VQGANConfig, VQGANModel, init_params
from lwm.utils import vision_io
from lwm.utils.atomic import replace_file

CODEBOOK_INITS = ("kmeans++", "random", "none")
STATE_FILE, WEIGHTS_FILE, METRICS_FILE = "train_state.msgpack", "vqgan.msgpack", "metrics.jsonl"
MEDIA_EXTENSIONS = vision_io.IMAGE_EXTENSIONS + (".mp4", ".mov", ".mkv", ".webm", ".avi")


def get_default_config() -> ConfigDict:
    """Every flag of `python -m lwm.train_vqgan` and its default."""
    c = ConfigDict()
    c.data_dir = ""                 # folder of images (png/jpg/...) and videos (mp4/...), read recursively
    c.output_dir = ""               # vqgan.msgpack, train_state.msgpack, metrics.jsonl
    c.vqgan_config = "released"     # a VQGANConfig preset ('released', 'tiny') or json::path
    c.update_vqgan_config = ""      # "dict(num_embeddings=1024, resolution=64)": VQGANConfig fields
    c.resume = False                # continue the run in output_dir (its train_state.msgpack)
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8                # frames per step (FolderFrames)
    c.lr = 1e-4                     # Adam learning rate (constant)
    c.frames_per_video = 8          # frames sampled evenly from each video (vision_io.sample_frame_indices)
    c.max_frames = 20000            # frames held in memory (uint8) from the folder; files past it are not read
    c.codebook_init = "kmeans++"    # kmeans++ | random | none
    c.dead_code_steps = 100         # restart a code unused for this many steps; 0 = never
    c.disc_weight = 0.0             # patch-discriminator generator-loss weight; 0 = no discriminator
    c.disc_start = 0                # step from which the discriminator loss counts
    c.log_every = 10
    c.save_every = 100              # checkpoint every this many steps (and at the end)
    c.lock()
    return c


# ------------------------------------------------------------------------------------- validation

def vqgan_config_from_flags(config: ConfigDict) -> VQGANConfig:
    """--vqgan_config then --update_vqgan_config; FlagError naming the flag."""
    try:
        vq = VQGANConfig.load(config.vqgan_config)
    except (ValueError, TypeError) as e:
        raise FlagError(f"--vqgan_config={config.vqgan_config!r}: {e}") from None
    updates = parse_literal_dict(config.update_vqgan_config, "update_vqgan_config")
    try:
        return vq.replace(**updates)
    except (ValueError, TypeError) as e:
        raise FlagError(f"--update_vqgan_config: {e}") from None


def validate(config: ConfigDict, need_data_dir: bool = True) -> VQGANConfig:
    """Every flag checked before anything compiles; returns the VQGANConfig. FlagError (one line naming the
    flag) otherwise."""
    if not config.output_dir:
        raise FlagError("--output_dir is required: the folder for vqgan.msgpack and train_state.msgpack")
    if need_data_dir:
        if not config.data_dir:
            raise FlagError("--data_dir is required: a folder of images or videos")
        if not os.path.isdir(config.data_dir):
            raise FlagError(f"--data_dir={config.data_dir}: no such folder")
    at_least = dict(total_steps=1, batch_size=1, frames_per_video=1, max_frames=1, dead_code_steps=0,
                    disc_start=0, log_every=1, save_every=1)
    for name, low in at_least.items():
        if config[name] < low:
            raise FlagError(f"--{name}={config[name]} must be >= {low}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise FlagError(f"--lr={config.lr} must be a positive number")
    if not (config.disc_weight >= 0 and math.isfinite(config.disc_weight)):
        raise FlagError(f"--disc_weight={config.disc_weight} must be >= 0 (0 turns the discriminator off)")
    if config.codebook_init not in CODEBOOK_INITS:
        raise FlagError(f"--codebook_init={config.codebook_init!r}: choose one of {', '.join(CODEBOOK_INITS)}")
    vq = vqgan_config_from_flags(config)
    state = os.path.join(config.output_dir, STATE_FILE)
    if os.path.exists(state) and not config.resume:
        raise FlagError(f"--output_dir={config.output_dir} holds a run ({STATE_FILE}); pass --resume=True to "
                        "continue it or choose another folder")
    return vq


# ------------------------------------------------------------------------------------- data

def media_files(folder: str) -> list[str]:
    """Every image or video file under `folder` (MEDIA_EXTENSIONS, case-insensitive), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(MEDIA_EXTENSIONS)]
    return sorted(out)


class FolderFrames:
    """The frames of a folder's images and videos, held in memory as uint8 (F, R, R, 3), served as batches.

    Each image is one frame; each video gives at most `frames_per_video` frames spread evenly
    (vision_io.read_video_frames); every frame is resized and centre-cropped to R (vision_io.resize_center_crop;
    the media budgets of vision_io apply). Files are read in sorted order until `max_frames` frames are held.
    Batch k is frames perm_e[j*B:(j+1)*B] of epoch e = k // (F // B), j = k % (F // B), perm_e a permutation
    drawn from (seed, e): a pure function of k, so a resumed run starts at any batch (`__call__(start)`).
    A file that cannot be read raises ValueError naming it. Memory: F x R x R x 3 bytes (20,000 frames at
    256: 3.9 GB)."""

    def __init__(self, folder: str, resolution: int, batch_size: int, seed: int = 0,
                 frames_per_video: int = 8, max_frames: int = 20000):
        files = media_files(folder)
        if not files:
            raise FlagError(f"--data_dir={folder}: no image or video files ({', '.join(MEDIA_EXTENSIONS)})")
        frames = []
        for path in files:
            if vision_io.is_image_path(path):
                raw = [vision_io.read_image(path)]
            else:
                raw = vision_io.read_video_frames(path, frames_per_video)
            frames += [vision_io.resize_center_crop(f, resolution) for f in raw]
            if len(frames) >= max_frames:
                frames = frames[:max_frames]
                break
        if len(frames) < batch_size:
            raise FlagError(f"--batch_size={batch_size}: --data_dir={folder} gives only {len(frames)} frames")
        self.frames = np.stack(frames)                                    # (F, R, R, 3) uint8
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(frames) // batch_size
        self.files = len(files)

    def batch(self, k: int) -> np.ndarray:
        """Batch k: float32 (B, R, R, 3) in [-1, 1] (vision_io.to_model_range)."""
        epoch, j = divmod(k, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.frames))
        return vision_io.to_model_range(self.frames[perm[j * self.batch_size:(j + 1) * self.batch_size]])

    def __call__(self, start: int = 0) -> Iterator[np.ndarray]:
        k = start
        while True:
            yield self.batch(k)
            k += 1


def _batches(source, start: int) -> Iterator[np.ndarray]:
    """The batches of `source` from batch `start` (see the module docstring)."""
    if callable(source) and not hasattr(source, "__next__"):
        return iter(source(start))
    it = iter(source)
    for _ in range(start):
        next(it)
    return it


# ------------------------------------------------------------------------------------- maths

def psnr(mse) -> float:
    """Peak signal-to-noise ratio in dB of pixels in [-1, 1]: 10 log10(peak-to-peak^2 / MSE) with
    peak-to-peak 2, i.e. 10 log10(4 / MSE). MSE 0.04 -> 20.0 dB (the same image in [0, 255] has
    MSE 0.04 * 127.5^2 = 650.25 and 10 log10(255^2 / 650.25) = 20.0 dB). inf when MSE is 0."""
    mse = float(mse)
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def usage_stats(counts: np.ndarray) -> tuple[float, float]:
    """Code counts (V,) over a window -> (fraction of the V codes used at least once, perplexity
    exp(-sum_v p_v log p_v) with p = counts / sum: V when all codes are used equally, 1 when one code is)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum()))


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows of `points` (P, E) by k-means++ seeding (Arthur & Vassilvitskii 2007): the first uniformly, each
    next with probability proportional to its squared distance to the nearest row already chosen. With fewer
    than k distinct points, the rest are drawn uniformly (duplicates: they die and get restarted). (k, E)."""
    points = np.asarray(points, np.float64)
    chosen = [int(rng.integers(len(points)))]
    d2 = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(len(points), p=d2 / total)) if total > 0 else int(rng.integers(len(points)))
        chosen.append(i)
        d2 = np.minimum(d2, ((points - points[i]) ** 2).sum(1))
    return points[chosen].astype(np.float32)


def random_rows(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows of `points` (P, E) drawn uniformly, without replacement when P >= k. (k, E) float32."""
    idx = rng.choice(len(points), k, replace=len(points) < k)
    return np.asarray(points, np.float32)[idx]


def restart_dead_codes(embeddings: np.ndarray, last_used: np.ndarray, step: int, dead_after: int,
                       recent_z: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Codes v with step - last_used[v] >= dead_after (unused for `dead_after` steps) get a random row of
    `recent_z` (P, E), the encoder outputs of the last batch, and last_used[v] = step (in place).
    Returns (the new embeddings (V, E), the restarted code ids). dead_after 0: nothing is restarted.
    Example: last_used [5, 1, 5], step 5, dead_after 3 -> code 1 restarted."""
    if dead_after <= 0:
        return embeddings, np.zeros(0, np.int64)
    dead = np.flatnonzero(step - last_used >= dead_after)
    if not dead.size:
        return embeddings, dead
    embeddings = np.array(embeddings, np.float32, copy=True)
    embeddings[dead] = random_rows(recent_z, dead.size, rng)
    last_used[dead] = step
    return embeddings, dead


# ------------------------------------------------------------------------------------- the step

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, taming-transformers' NLayerDiscriminator without batch norm): 4x4 convs,
    stride 2 then 1, leaky ReLU 0.2, one logit per patch. (B, H, W, 3) -> (B, H/2**layers, W/2**layers, 1)."""

    width: int = 64
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = nn.leaky_relu(nn.Conv(self.width * 2 ** i, (4, 4), strides=(2, 2))(x), 0.2)
        x = nn.leaky_relu(nn.Conv(self.width * 2 ** self.layers, (4, 4))(x), 0.2)
        return nn.Conv(1, (4, 4))(x)


@functools.lru_cache(maxsize=None)
def make_optimizer(lr: float) -> optax.GradientTransformation:
    """Adam with taming-transformers' betas (0.5, 0.9), constant learning rate `lr`."""
    return optax.adam(lr, b1=0.5, b2=0.9)


@functools.partial(jax.jit, static_argnames=("model", "disc", "tx", "beta", "disc_weight"))
def vqgan_step(model: VQGANModel, disc, tx, beta: float, disc_weight: float, state: dict, pixels, disc_on):
    """One update of the VQGAN (and of the discriminator when `disc` is not None). pixels (B, H, W, 3);
    disc_on: 0.0 / 1.0, whether the discriminator counts at this step (a value, so no recompile).
    Returns (the new state, metrics dict, codes (B, h, w), z (B, h, w, E))."""

    def vqgan_loss(params):
        out = model.apply({"params": params}, pixels, method=VQGANModel.train_forward)
        rec = out["reconstruction"]
        terms = dict(l1=jnp.mean(jnp.abs(rec - pixels)), l2=jnp.mean((rec - pixels) ** 2),
                     codebook=out["codebook_loss"], commitment=out["commitment_loss"])
        loss = terms["l1"] + terms["l2"] + terms["codebook"] + beta * terms["commitment"]
        if disc is not None:
            terms["disc_g"] = -jnp.mean(disc.apply({"params": state["disc_params"]}, rec))
            loss = loss + disc_on * disc_weight * terms["disc_g"]
        terms["loss"] = loss
        return loss, (terms, out)

    (_, (terms, out)), grads = jax.value_and_grad(vqgan_loss, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
    rec = jax.lax.stop_gradient(out["reconstruction"])
    terms["mse_clipped"] = jnp.mean((jnp.clip(rec, -1.0, 1.0) - pixels) ** 2)   # PSNR's MSE: what decode gives
    if disc is not None:
        def disc_loss(dp):                                   # hinge: relu(1 - D(x)) + relu(1 + D(x_hat))
            real, fake = disc.apply({"params": dp}, pixels), disc.apply({"params": dp}, rec)
            return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))

        d_loss, d_grads = jax.value_and_grad(disc_loss)(state["disc_params"])
        d_updates, d_opt = tx.update(jax.tree.map(lambda g: disc_on * g, d_grads), state["disc_opt_state"],
                                     state["disc_params"])
        new.update(disc_params=optax.apply_updates(state["disc_params"], d_updates), disc_opt_state=d_opt)
        terms["disc_d"] = d_loss
    return new, terms, out["codes"], out["z"]


@functools.partial(jax.jit, static_argnames=("model",))
def encode_latents(model: VQGANModel, params, pixels):
    """(B, H, W, 3) -> encoder outputs z (B, h, w, E) before quantization."""
    return model.apply({"params": params}, pixels, method=VQGANModel.encode_latents)


# ------------------------------------------------------------------------------------- state files

def _host(tree):
    return jax.tree.map(np.asarray, tree)


def save_checkpoint(output_dir: str, vq_config: VQGANConfig, state: dict, extra: dict) -> None:
    """train_state.msgpack (the state, `extra` = step, position, counters), then vqgan.msgpack (weights);
    each replaced atomically."""
    blob = flax.serialization.msgpack_serialize(
        {"state": flax.serialization.to_state_dict(_host(state)), "extra": extra,
         "vqgan_config": json.dumps(dataclasses.asdict(vq_config))})
    with replace_file(os.path.join(output_dir, STATE_FILE)) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)
    with replace_file(os.path.join(output_dir, WEIGHTS_FILE)) as tmp:
        VQGAN(vq_config, _host(state["params"])).save(tmp)


def load_checkpoint(output_dir: str, vq_config: VQGANConfig, template: dict) -> tuple[dict, dict]:
    """(state shaped like `template`, extra) from train_state.msgpack; ValueError when the run was made with
    another VQGANConfig."""
    path = os.path.join(output_dir, STATE_FILE)
    with open(path, "rb") as f:
        blob = flax.serialization.msgpack_restore(f.read())
    saved = json.loads(blob["vqgan_config"])
    if saved != json.loads(json.dumps(dataclasses.asdict(vq_config))):
        raise ValueError(f"{path}: the run was made with another VQGANConfig ({saved}); resume it with the same "
                         "--vqgan_config/--update_vqgan_config")
    state = flax.serialization.from_state_dict(template, blob["state"])
    return jax.tree.map(jnp.asarray, state), blob["extra"]


# ------------------------------------------------------------------------------------- the loop

def _codebook_init(config, vq: VQGANConfig, model, params, batches: list, rng) -> dict:
    z = np.concatenate([np.asarray(encode_latents(model, params, jnp.asarray(b))).reshape(-1, vq.quantized_embed_dim)
                        for b in batches])
    pick = kmeans_plus_plus if config.codebook_init == "kmeans++" else random_rows
    params = jax.tree.map(lambda x: x, params)
    params["quantize"] = dict(params["quantize"], embeddings=jnp.asarray(pick(z, vq.num_embeddings, rng)))
    return params


def train_vqgan(config: ConfigDict, frames_source: Iterable | Callable[[int], Iterator], *,
                vq_config: VQGANConfig | None = None, out=sys.stdout) -> dict:
    """Train to config.total_steps on `frames_source` (module docstring), checkpointing into config.output_dir.
    Returns {"history": [metrics row per logged step], "restarted": total codes restarted, "step": steps done,
    "weights": path of vqgan.msgpack}. Raises FlagError on a bad flag (checked before anything compiles),
    ValueError on a batch of the wrong shape."""
    vq = vq_config or validate(config, need_data_dir=False)
    os.makedirs(config.output_dir, exist_ok=True)
    model = VQGANModel(vq)
    tx = make_optimizer(config.lr)
    disc = PatchDiscriminator() if config.disc_weight > 0 else None
    params = init_params(vq, config.seed)
    state = dict(params=params, opt_state=tx.init(params))
    if disc is not None:
        r = vq.resolution
        dp = disc.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, r, r, vq.num_channels)))["params"]
        state.update(disc_params=dp, disc_opt_state=tx.init(dp))
    V = vq.num_embeddings
    extra = dict(step=0, position=0, last_used=np.zeros(V, np.int64), window=np.zeros(V, np.int64),
                 restarted=0, window_restarted=0, sums={})
    if config.resume and os.path.exists(os.path.join(config.output_dir, STATE_FILE)):
        state, saved = load_checkpoint(config.output_dir, vq, state)
        extra.update({k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in saved.items()})
        print(f"lwm.train_vqgan: resumed at step {extra['step']} from {config.output_dir}", file=out, flush=True)
    step = extra["step"]
    batches = _batches(frames_source, extra["position"])
    expect = (vq.resolution, vq.resolution, vq.num_channels)

    def next_batch():
        b = np.asarray(next(batches), np.float32)
        if b.ndim != 4 or b.shape[1:] != expect:
            raise ValueError(f"frames_source: expected batches (N, {', '.join(map(str, expect))}) in [-1, 1], "
                             f"got shape {b.shape}")
        return b

    pending = []
    if step == 0 and config.codebook_init != "none":
        per_batch = None
        while per_batch is None or len(pending) * per_batch < V and len(pending) < 16:
            pending.append(next_batch())
            per_batch = pending[0].shape[0] * vq.codes_per_side ** 2
        state["params"] = _codebook_init(config, vq, model, state["params"], pending,
                                         np.random.default_rng([config.seed, 1 << 30]))
        print(f"lwm.train_vqgan: codebook initialised ({config.codebook_init}) from "
              f"{sum(len(b) for b in pending) * vq.codes_per_side ** 2} encoder outputs", file=out, flush=True)
    history, t0 = [], time.time()
    metrics_path = os.path.join(config.output_dir, METRICS_FILE)
    while step < config.total_steps:
        pixels = pending.pop(0) if pending else next_batch()
        disc_on = jnp.float32(1.0 if (disc is not None and step >= config.disc_start) else 0.0)
        state, terms, codes, z = vqgan_step(model, disc, tx, float(vq.commitment_cost), float(config.disc_weight),
                                            state, jnp.asarray(pixels), disc_on)
        extra["position"] += 1
        codes = np.asarray(codes).reshape(-1)
        extra["last_used"][codes] = step
        extra["window"] += np.bincount(codes, minlength=V)
        if config.dead_code_steps and np.any(step - extra["last_used"] >= config.dead_code_steps):
            emb, dead = restart_dead_codes(np.asarray(state["params"]["quantize"]["embeddings"]), extra["last_used"],
                                           step, config.dead_code_steps,
                                           np.asarray(z).reshape(-1, vq.quantized_embed_dim),
                                           np.random.default_rng([config.seed, step]))
            state["params"] = dict(state["params"], quantize=dict(state["params"]["quantize"],
                                                                  embeddings=jnp.asarray(emb)))
            extra["restarted"] += int(dead.size)
            extra["window_restarted"] += int(dead.size)
        sums = extra["sums"]                                   # the log window's sums, saved with the state
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        sums["n"] = sums.get("n", 0) + 1
        step += 1
        extra["step"] = step
        if step % config.log_every == 0 or step == config.total_steps:
            n = sums.pop("n")
            row = {k: v / n for k, v in sums.items() if k != "mse_clipped"}
            used, perplexity = usage_stats(extra["window"])
            row.update(step=step, psnr=psnr(float(terms["mse_clipped"])), codebook_used=used,
                       perplexity=perplexity, restarted=extra["window_restarted"],
                       restarted_total=extra["restarted"])
            history.append(row)
            parts = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", "l1", "l2", "codebook", "commitment",
                                                            "disc_g", "disc_d") if k in row)
            print(f"step {step}/{config.total_steps} | {parts} | psnr {row['psnr']:.2f} dB | codebook used "
                  f"{used:.3f} ({int(round(used * V))}/{V}) perplexity {perplexity:.1f} | restarted "
                  f"{row['restarted']} (total {row['restarted_total']}) | {time.time() - t0:.1f}s",
                  file=out, flush=True)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            extra["sums"], extra["window"], extra["window_restarted"] = {}, np.zeros(V, np.int64), 0
        if step % config.save_every == 0 or step == config.total_steps:
            save_checkpoint(config.output_dir, vq, state, extra)
            print(f"lwm.train_vqgan: saved step {step} to {config.output_dir}", file=out, flush=True)
    return dict(history=history, restarted=extra["restarted"], step=step,
                weights=os.path.join(config.output_dir, WEIGHTS_FILE))
