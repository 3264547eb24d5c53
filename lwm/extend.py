"""`python -m lwm.extend --plan=FILE`: staged context extension with gates. Each stage of the plan trains
through lwm.train from the previous stage's checkpoint at a longer length and new RoPE settings, then its gates
run (held-out short-text loss against the stage before, the needle eval and a suite subset at the stage's
length); a failed gate stops the run with its value and threshold. A rerun resumes after a kill.

    python -m lwm.extend --plan=docs/plans/tiny_cpu.yaml --data_dir=outputs/tiny_data --workdir=outputs/extend
Hardware: the tiny plan (1K -> 4K -> 16K, a few steps each) runs on one CPU core-pair in a few minutes; the
paper's plan (docs/plans/lwm_paper.yaml) needs a TPU pod slice per stage. Exit status: 0 every gate passed,
1 a gate failed (the report names it), 2 a bad flag or plan field (one line naming file, stage and field).
Plan fields and the report: docs/context_extension.md ("Staged extension with gates").
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from ml_collections import ConfigDict

from lwm.cli.command import cli, parse, require
from lwm.cli.values import FlagError


def get_default_config() -> ConfigDict:
    """Every flag and its default."""
    c = ConfigDict()
    c.plan = ""                                # required: the plan (YAML or JSON)
    c.workdir = ""                             # '' = outputs/extend/<plan name>: checkpoints, gates, state.json
    c.data_dir = ""                            # relative paths in the plan are taken from here ('' = its folder)
    c.report = ""                              # '' = <workdir>/report.json
    c.lock()
    return c


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse flags, check the whole plan, run it; exits 1 when a gate fails."""
    from lwm.tools import extension

    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    require(config, "plan", why="a YAML or JSON plan of stages")
    if not os.path.isfile(config.plan):
        raise FlagError(f"--plan={config.plan}: no such file")
    plan = extension.load_plan(config.plan, config.data_dir)
    workdir = config.workdir or os.path.join("outputs", "extend", plan.name)
    print(f"extend: plan {plan.path} ({len(plan.stages)} stages: "
          f"{' -> '.join(f'{s.name} ({s.seq_length})' for s in plan.stages)}), workdir {workdir}", flush=True)
    report = extension.run(plan, workdir, config.report)
    print(extension.report_table(report))
    print(f"report: {report['report']}")
    if report["status"] == "failed":
        f = report["failed"]
        print(f"lwm.extend: stopped: stage {f['stage']}: gate {f['gate']} failed: value {f['value']:.4g}, "
              f"threshold {f['threshold']:g} ({f['rule']})", file=sys.stderr, flush=True)
        raise SystemExit(1)
    print("extend: every stage passed its gates")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(cli("lwm.extend", main, get_default_config, __doc__))
