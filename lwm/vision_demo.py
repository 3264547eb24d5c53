"""`python -m lwm.vision_demo`: the second offline main job. Generate the synthetic video-language world, train a
VQGAN on it, encode it, train the vision-language LWM (masked sequence packing, loss weighting), then evaluate
world QA, text-to-image/video by pixel rules and the visual needles; prints where the results, the PNG grid of
generated frames and the MP4 are.

Hardware: 2 CPU cores; `bash scripts/run_vision_demo.sh` took 6 minutes on a quiet 2-core CPU (16 on one shared
with other jobs), `--size=small` a few minutes. The library is lwm/tools/vision_demo.py; docs/vision_demo.md has a run's figures.
    python -m lwm.vision_demo --workdir=outputs/vision_demo
    python -m lwm.vision_demo --size=small --workdir=/tmp/vd
"""
from __future__ import annotations

import sys

from lwm.cli.command import cli
from lwm.tools.vision_demo import get_default_config, main

if __name__ == "__main__":
    sys.exit(cli("lwm.vision_demo", main, get_default_config, __doc__))
