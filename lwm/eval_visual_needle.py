"""`python -m lwm.eval_visual_needle`: the visual needle (lwm/evals/visual.py) on a vision-language LWM:
a frame showing a number at a depth of a video of N frames, encoded with the VQGAN, and a question about it;
accuracy by frame count and depth to --output_dir (results.json, summary.md, plots/visual_needle.png).

Hardware: one CPU for tiny random models (seconds per video); an accelerator for 7B with the released VQGAN.
    python -m lwm.eval_visual_needle --load_llama_config=7b --load_checkpoint=params::/ckpt/params \
        --vqgan_checkpoint=/ckpt/vqgan --tokenizer=/ckpt/tokenizer.model --frame_counts=8,32,128 \
        --update_llama_config="dict(theta=50000000, max_sequence_length=131072)"
    python -m lwm.eval_visual_needle --load_llama_config=tiny --vqgan_config=tiny --tokenizer=tok.model  # random
--video_file=clip.mp4 takes the haystack frames from a local video instead of the synthetic one.
--tasks=visual_needle,visual_order,visual_count adds the ordering needle (which of two inserted object frames
came first) and the counting needle (how many frames show an object), lwm/evals/visual.py.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def get_default_config():
    from ml_collections import ConfigDict

    from lwm.inference import runtime

    c = runtime.vision_flags(ConfigDict())
    c.tasks = "visual_needle"               # comma list of visual_needle, visual_order, visual_count
    c.frame_counts = "4,8,16"
    c.depths = "0,50,100"
    c.n_samples = 2
    c.video_file = ""                       # haystack frames from a local video; '' = synthetic
    c.max_new_tokens = 16
    c.batch = 8                             # videos per generation call
    c.threshold = 85.6
    c.output_dir = "results/visual_needle"
    c.progress = True
    c.lock()
    return c


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import jax

    from lwm.cli.command import parse
    from lwm.evals import report, runner, visual
    from lwm.evals.backends import JaxBackend
    from lwm.model.vqgan import VQGAN, VQGANConfig

    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    try:
        counts = [int(x) for x in config.frame_counts.split(",") if x.strip()]
        depths = [float(x) for x in config.depths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--frame_counts={config.frame_counts} / --depths={config.depths}: comma-separated "
                         "numbers expected") from None
    if config.video_file and not os.path.isfile(config.video_file):
        raise FileNotFoundError(f"--video_file={config.video_file}: no such file")
    vq_config = VQGANConfig.load(config.vqgan_config)
    backend = JaxBackend.from_flags(config, modality="vision,text", sample_mode="text", random_if_empty=True)
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    known = {visual.TASK: visual.VISUAL_NEEDLE, visual.ORDER_TASK: visual.VISUAL_ORDER,
             visual.COUNT_TASK: visual.VISUAL_COUNT}
    if not tasks or any(t not in known for t in tasks):
        raise ValueError(f"--tasks={config.tasks}: choose from {', '.join(known)}")
    size = vq_config.resolution
    samples = []
    if visual.TASK in tasks:
        samples += visual.build_samples(counts, depths, config.n_samples, config.seed, size, config.video_file)
    if visual.ORDER_TASK in tasks:
        order_counts = [n for n in counts if n >= 2]
        if len(order_counts) < len(counts):
            print(f"eval_visual_needle: visual_order needs >= 2 frames; frame counts left out for it: "
                  f"{[n for n in counts if n < 2]}")
        samples += visual.build_order_samples(order_counts, depths, config.n_samples, config.seed, size,
                                              config.video_file)
    if visual.COUNT_TASK in tasks:
        samples += visual.build_count_samples(counts, config.n_samples, config.seed, size, config.video_file)
    vqgan = VQGAN.load(config.vqgan_checkpoint or None, vq_config, seed=config.seed)
    run_tasks = {t: known[t].with_models(vqgan, backend.tokenizer, config.max_new_tokens) for t in tasks}
    with jax.set_mesh(backend.mesh):           # the VQGAN encodes under the mesh too
        records = runner.run(samples, backend, run_tasks, max_tokens_per_batch=None, max_rows=config.batch,
                             progress=config.progress, desc="visual needle")
    info = dict(model=config.load_checkpoint or "random", vqgan=config.vqgan_checkpoint or "random", tasks=tasks,
                frame_counts=counts, depths=depths, n_samples=config.n_samples, video_file=config.video_file)
    summary = report.write_results(config.output_dir, records, info, config.threshold, xlabel="frames")
    print(report.summary_table(summary, length_name="frames"))
    return summary


if __name__ == "__main__":
    from lwm.cli.command import cli

    sys.exit(cli("lwm.eval_visual_needle", main, get_default_config, __doc__))
