"""`python -m lwm.train_vqgan`: train a VQGAN image tokenizer on a folder of images and videos.

    python -m lwm.train_vqgan --data_dir=/data/frames --output_dir=/runs/vq --vqgan_config=tiny \
        --update_vqgan_config="dict(num_embeddings=1024)" --batch_size=8 --total_steps=2000 --lr=1e-4

Hardware: a small config (docs/vqgan.md, "Training a VQGAN") trains on a 2-core CPU; the released 256 x 256
config wants an accelerator. Expect PSNR (printed every --log_every steps) to climb and codebook usage to stay
well above zero; output_dir/vqgan.msgpack is what `--vqgan_checkpoint` of the vision commands reads, and
`--resume=True` continues a run bitwise. The library is lwm.training.vqgan (train_vqgan(config, frames_source)
also takes any iterator of frame batches). See docs/vqgan.md.
"""
from __future__ import annotations

import sys
from typing import Optional

from lwm.cli import command
from lwm.training.vqgan import FolderFrames, get_default_config, train_vqgan, validate
from lwm.utils.logs import quiet_absent_backends

__all__ = ["get_default_config", "main", "cli"]


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse and check every flag (one line naming a bad one, before anything compiles), read the folder,
    train. Returns train_vqgan's result."""
    config = command.parse(sys.argv[1:] if argv is None else list(argv), get_default_config())
    vq_config = validate(config)
    source = FolderFrames(config.data_dir, vq_config.resolution, config.batch_size, seed=config.seed,
                          frames_per_video=config.frames_per_video, max_frames=config.max_frames)
    print(f"lwm.train_vqgan: {len(source.frames)} frames from {source.files} files of {config.data_dir} "
          f"({source.per_epoch} batches of {config.batch_size} per epoch)", flush=True)
    return train_vqgan(config, source, vq_config=vq_config)


def cli(argv: Optional[list[str]] = None) -> int:
    """`python -m lwm.train_vqgan`: lwm.cli.command.cli (bad flags or files: one line, exit 2)."""
    quiet_absent_backends()
    return command.cli("lwm.train_vqgan", main, get_default_config, __doc__, argv)


if __name__ == "__main__":
    sys.exit(cli())
