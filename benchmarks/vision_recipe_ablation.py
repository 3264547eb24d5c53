"""The packing ablation in miniature (issue 24): the vision demo's model trained with four data recipes, three seeds
each, on one world, one VQGAN and one token budget, then scored by the demo's evaluations.

Hardware: 2-core CPU. The default size took 35 minutes (2,082 s) on this workplace's 2-core machine shared with
other jobs (load 10-20; docs/vision_demo.md, "The packing ablation"); there every variant was at chance on world QA.
`--quick` is a smoke run of a few minutes (7 with --seeds 0,1 on the loaded machine) whose numbers mean nothing.
Run: python benchmarks/vision_recipe_ablation.py --out outputs/vision_ablation [--quick] [--seeds 0,1,2]
     [--variants a,b,c,d] [--lm_steps 200 --lm_seq 512 --lm_batch 2 ...] (every size field of SIZES is a flag)

Variants (json_vision dataset fields given to `lwm.train` by lwm.tools.vision_demo.train_lm):
  a  masked sequence packing + loss weighting, the demo's recipe: mode=pack, loss_weighting=example,
     text_loss_weight 1.0, vision_loss_weight 0.5 (lwm.tools.vision_demo.RECIPE);
  b  packing without the cross-example attention mask: a + cross_example_attention=True (every example of a row
     has segment id 1 and positions run on across the row: examples see their row-mates);
  c  packing with the mask, no loss weighting: loss_weighting=token (every target token of a modality counts the
     same, so long examples count more) and text/vision weights 1.0 / 1.0;
  d  no packing: a with mode=pad (one example per row, right-padded).
The token budget is the same for all: lm_steps x lm_batch rows x lm_seq slots. Padding slots count towards it
(they are computed, with loss weight 0), so d sees fewer examples; the table gives each variant's fill (real
slots / all slots) and the examples it read.

Shared once by all runs (lwm.tools.vision_demo.prepare): the world, the VQGAN, the encoded JSON, the tokenizer.
A seed s changes the model's initialisation, the order of the training records (the JSON is shuffled with s) and
nothing else: every run is scored on the same held-out questions and generation prompts (evaluation seed 0).
A finished run's results (runs/<variant>/seed<s>/result.json) are reused when the benchmark is started again
with the same --out. Compilations are shared through a persistent JAX cache under --out (jax_cache/), so only the
first run of a shape compiles; tokens/s excludes the first step (compilation) in any case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

VARIANTS = {
    "a": ("masked packing + loss weighting (the demo)", {}),
    "b": ("packing without the cross-example mask", {"cross_example_attention": True}),
    "c": ("masked packing, no loss weighting", {"loss_weighting": "token", "text_loss_weight": 1.0,
                                                "vision_loss_weight": 1.0}),
    "d": ("no packing (one example per row)", {"mode": "pad"}),
}
# World, VQGAN, language model and evaluation sizes (the keys lwm.tools.vision_demo uses).
SIZES = {
    "default": dict(train_videos=200, train_images=200, test_scenes=12, codes=128, vqgan_steps=160, vqgan_batch=16,
                    lm_steps=240, lm_batch=2, lm_seq=512, lm_lr=3e-3, hidden=64, layers=2, gen_prompts=4,
                    needle_samples=1, frame_counts="4", qa_per_scene=4, vocab_size=512),
    "quick": dict(train_videos=24, train_images=24, test_scenes=2, codes=64, vqgan_steps=10, vqgan_batch=16,
                  lm_steps=6, lm_batch=2, lm_seq=512, lm_lr=3e-3, hidden=64, layers=2, gen_prompts=1,
                  needle_samples=1, frame_counts="4", qa_per_scene=2, vocab_size=400),
}
EVAL_SEED = 0


def recipe(variant: str) -> dict:
    """The json_vision dataset fields of a variant: the demo's RECIPE with the variant's changes."""
    from lwm.tools import vision_demo as vd

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose from {', '.join(VARIANTS)}")
    return {**vd.RECIPE, **VARIANTS[variant][1]}


def dataset_config(variant: str, data: str, sz: dict) -> dict:
    """The DatasetFactory config lwm.train builds from train_lm's flags for this variant (for the test that the
    variants' batches differ as claimed)."""
    from lwm.tools import vision_demo as vd

    return {"type": "json_vision",
            "vision_text_processor": {"fields_from_example": "fields",
                                      "n_tokens_per_frame": (vd.RESOLUTION // 4) ** 2},
            "json_vision_dataset": {"path": data, "seq_length": sz["lm_seq"], "batch_size": sz["lm_batch"],
                                    **recipe(variant)}}


def train_stats(metrics_path: str, tokens_per_step: int) -> dict:
    """From lwm.train's metrics.jsonl: steady tokens/s (mean over log rows after step 0, whose window holds the
    compilation), fill (real slots / all slots) and examples read per step (dataset_examples over the steps done,
    at the last log row; it counts the one example that may wait for the next batch), and the last row's losses."""
    rows = [json.loads(line) for line in open(metrics_path)]
    steady = [r["tokens_per_second"] for r in rows if r["step"] > 0]
    last = rows[-1]
    return dict(tokens_per_s=float(np.mean(steady)) if steady else float("nan"),
                fill=float(last.get("dataset_packing_efficiency", float("nan"))),
                examples_per_step=float(last.get("dataset_examples", 0)) / (int(last["step"]) + 1),
                last_step=int(last["step"]),
                text_loss=float(last.get("text_loss", float("nan"))),
                vision_loss=float(last.get("vision_loss", float("nan"))), tokens_per_step=tokens_per_step)


def run_one(variant: str, seed: int, prep: dict, data: str, sz: dict, out: str, sampling: tuple) -> dict:
    """Train one variant with one seed and evaluate it; the result is written to runs/<variant>/seed<seed>/."""
    from lwm.tools import vision_demo as vd

    workdir = os.path.join(out, "runs", variant, f"seed{seed}")
    path = os.path.join(workdir, "result.json")
    if os.path.exists(path):
        print(f"ablation: {variant} seed {seed}: reusing {path}", flush=True)
        return json.load(open(path))
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    checkpoint = vd.train_lm(data, prep["tokenizer_path"], workdir, sz, seed, recipe(variant))
    train_s = time.time() - t0
    stats = train_stats(os.path.join(workdir, "train", "lm", "metrics.jsonl"), sz["lm_batch"] * sz["lm_seq"])
    t0 = time.time()
    flags = vd.backend_flags(checkpoint, prep["tokenizer_path"], prep["vqgan_weights"], sz, EVAL_SEED)
    qa, _, _ = vd.evaluate_qa_and_needles(flags, prep["vqgan"], sz, EVAL_SEED, needles=False)
    gen_rows, _ = vd.evaluate_generation(flags, prep["vqgan"], prep["tokenizer"], sz, EVAL_SEED, *sampling)
    result = dict(variant=variant, seed=seed, recipe=recipe(variant), train_wall_s=train_s,
                  eval_wall_s=time.time() - t0, **stats, scores=scores(qa, gen_rows))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    import glob
    import shutil

    for step_dir in glob.glob(os.path.join(workdir, "train", "lm", "step_*")):   # not needed again: keep --out small
        shutil.rmtree(step_dir)
    print(f"ablation: {variant} seed {seed}: {json.dumps(result['scores'])}; {stats['tokens_per_s']:.0f} tokens/s; "
          f"train {train_s:.0f} s, eval {result['eval_wall_s']:.0f} s", flush=True)
    return result


def scores(qa: list, gen_rows: list) -> dict:
    """Accuracy (%) per column: world QA (image, video) over every held-out question, and the pixel rules on the
    generated frames over both prompt splits (train pairs and held-out pairs)."""
    out = {}
    for task, col in (("world_image_qa", "image_qa"), ("world_video_qa", "video_qa")):
        s = [r["score"] for r in qa if r["task"] == task]
        out[col] = float(np.mean(s)) if s else float("nan")
    for task, col in (("text_to_image", "t2i"), ("text_to_video", "t2v")):
        rs = [r for r in gen_rows if r["task"] == task]
        for rule in (rs[0]["generated"] if rs else {}):
            out[f"{col}_{rule}"] = 100 * float(np.mean([r["generated"][rule] for r in rs]))
    return out


def reference_rows(prep: dict, sz: dict) -> dict:
    """The columns' chance (uniform answerer / uniform draw from the rule's answers) and the pixel rules on the
    VQGAN's reconstructions of the prompts' ground-truth frames (what a perfect model over this VQGAN reaches)."""
    from lwm.data import world
    from lwm.evals import world as world_eval
    from lwm.tools import vision_demo as vd

    cfg, chance = vd.world_config(), {}
    for image, col in ((True, "image_qa"), (False, "video_qa")):
        samples = world_eval.build_samples(sz["test_scenes"], EVAL_SEED, cfg, image=image,
                                           max_questions=sz["qa_per_scene"])
        chance[col] = 100 * float(np.mean([1 / len(s["choices"]) for s in samples]))
    rules = dict(colour=100 / len(world.COLOURS), shape=100 / len(world.SHAPES),
                 direction=100 / len(world.DIRECTIONS))
    recon = {}
    for image, col in ((True, "t2i"), (False, "t2v")):
        cases = [s for split in ("train", "test")
                 for s in vd.generation_cases(sz["gen_prompts"], EVAL_SEED + 5_000_000, image, split)]
        truth = [world.render(s, vd.RESOLUTION) for s in cases]
        from lwm.utils.vision_io import to_uint8

        rec = to_uint8(prep["vqgan"].decode(np.stack(vd.encode(prep["vqgan"], truth))))
        per = [vd.score_frames(r, s.objects[0]) for r, s in zip(rec, cases)]
        for rule in per[0]:
            chance[f"{col}_{rule}"] = rules[rule]
            recon[f"{col}_{rule}"] = 100 * float(np.mean([p[rule] for p in per]))
    return dict(chance=chance, reconstruction=recon)


def aggregate(results: list) -> list:
    """Per variant: mean, sample std (ddof 1) and min/max over seeds of every score, tokens/s, fill, examples/step."""
    out = []
    for v in VARIANTS:
        rs = [r for r in results if r["variant"] == v]
        if not rs:
            continue
        row = dict(variant=v, name=VARIANTS[v][0], seeds=[r["seed"] for r in rs])
        values = {k: [r["scores"][k] for r in rs] for k in rs[0]["scores"]}
        values.update({k: [r[k] for r in rs] for k in ("tokens_per_s", "fill", "examples_per_step", "text_loss",
                                                       "vision_loss", "train_wall_s", "eval_wall_s")})
        for k, xs in values.items():
            xs = np.asarray(xs, float)
            row[k] = dict(mean=float(xs.mean()), std=float(xs.std(ddof=1)) if len(xs) > 1 else 0.0,
                          min=float(xs.min()), max=float(xs.max()), values=xs.tolist())
        out.append(row)
    return out


COLUMNS = (("image_qa", "image QA"), ("video_qa", "video QA"), ("t2i_colour", "t2i colour"),
           ("t2i_shape", "t2i shape"), ("t2v_colour", "t2v colour"), ("t2v_shape", "t2v shape"),
           ("t2v_direction", "t2v direction"))


def markdown(rows: list, ref: dict, sz: dict) -> str:
    """The table: each score as mean ± std (min-max) over seeds, in %; tokens/s, fill and examples as means."""
    cols = [c for c in COLUMNS if rows and c[0] in rows[0]]
    head = ["variant"] + [n for _, n in cols] + ["tokens/s", "fill %", "examples / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['variant']}: {r['name']}"]
        cells += [f"{r[k]['mean']:.1f} ± {r[k]['std']:.1f} ({r[k]['min']:.1f}-{r[k]['max']:.1f})" for k, _ in cols]
        cells += [f"{r['tokens_per_s']['mean']:.0f} ± {r['tokens_per_s']['std']:.0f}",
                  f"{100 * r['fill']['mean']:.0f}", f"{r['examples_per_step']['mean']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for key, name in (("chance", "chance"), ("reconstruction", "pixel rules on VQGAN reconstructions")):
        lines.append("| " + " | ".join([name] + [f"{ref[key][k]:.1f}" if k in ref[key] else "" for k, _ in cols]
                                       + ["", "", ""]) + " |")
    n_seeds = len(rows[0]["seeds"]) if rows else 0
    lines.append(f"\nAccuracy %, mean ± sample std (min-max) over {n_seeds} seeds; budget {sz['lm_steps']} steps x "
                 f"{sz['lm_batch']} rows x {sz['lm_seq']} slots = {sz['lm_steps'] * sz['lm_batch'] * sz['lm_seq']:,} "
                 f"token slots per run (padding counts). QA: {sz['test_scenes']} held-out scenes per medium, <= "
                 f"{sz['qa_per_scene']} questions each; generation: {2 * sz['gen_prompts']} prompts per medium "
                 f"(train + held-out pairs). Fill and examples / step: at the last logged step; tokens/s: "
                 f"training steps only, first step (compilation) excluded.")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/vision_ablation")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (numbers mean nothing)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="a,b,c,d")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=16)
    for key, value in SIZES["default"].items():
        p.add_argument(f"--{key}", type=type(value), default=None)
    args = p.parse_args(argv)
    sz = dict(SIZES["quick" if args.quick else "default"])
    sz.update({k: getattr(args, k) for k in sz if getattr(args, k) is not None})
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={args.seeds!r}: comma-separated integers expected")
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        p.error(f"--variants={args.variants!r}: choose from {','.join(VARIANTS)}")
    for k, v in sz.items():
        if not isinstance(v, str) and v <= 0:
            p.error(f"--{k}={v} must be > 0")
    if sz["lm_seq"] % 256:
        p.error(f"--lm_seq={sz['lm_seq']} must be a multiple of 256 (the model's scan chunk, vision_demo.model_updates)")
    return args, sz, seeds, variants


def main(argv=None) -> dict:
    args, sz, seeds, variants = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "jax_cache"))   # read by jax at import,
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")            # here and in lwm.train
    from lwm.tools import vision_demo as vd

    start, times = time.time(), {}
    shared = os.path.join(out, "shared")
    os.makedirs(shared, exist_ok=True)
    prep = vd.prepare(shared, sz, EVAL_SEED, times)
    data = {}
    for s in seeds:                       # the same records, shuffled with each seed
        data[s] = os.path.join(shared, f"vision_text_seed{s}.jsonl")
        vd.write_json_data(data[s], prep["scenes"], prep["codes"], sz["qa_per_scene"], s)
    results = [run_one(v, s, prep, data[s], sz, out, (args.temperature, args.top_k)) for s in seeds for v in variants]
    ref = reference_rows(prep, sz)
    rows = aggregate(results)
    table = markdown(rows, ref, sz)
    total = time.time() - start
    summary = dict(sizes=sz, seeds=seeds, variants={v: dict(name=VARIANTS[v][0], recipe=recipe(v)) for v in variants},
                   vqgan=prep["vq_stats"], examples_in_data=prep["kinds"], reference=ref, rows=rows, runs=results,
                   wall_s=round(total, 1), shared_s={k: round(v, 1) for k, v in times.items()})
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table + "\n")
    print(f"\n== vision recipe ablation done in {total:.0f} s (VQGAN PSNR {prep['vq_stats']['test_psnr']:.1f} dB, "
          f"{prep['vq_stats']['codes_used']}/{sz['codes']} codes used)\n{table}")
    print(f"   results: {os.path.join(out, 'ablation.json')}, {os.path.join(out, 'ablation.md')}")
    return summary


if __name__ == "__main__":
    main()
