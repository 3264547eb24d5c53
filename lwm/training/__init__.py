"""Training (layer: engines; never imports inference, serving or evals).

  steps.py         loss_fn (text and vision+text), train_step, eval_step, the train state
  compile.py       the one place the step meets its shardings (used by the loop, the memory planner, the benchmark and the
                   sharded-parity test; tests/test_one_home.py::test_rule_holds[train_step_shardings])
  flags.py         the flags of `python -m lwm.train` and their defaults (also read by lwm.tools.extension)
  loop.py          the loop behind `python -m lwm.train`: restore, step, evaluate, log, save
  optimizer.py     AdamW, schedules, accumulation (the original's --optimizer.* flags)
  dataset.py       the original's dataset configuration; data_sources.py where examples come from;
  packing.py       masked sequence packing and exact resume
  metrics.py       metrics files, Weights & Biases, step timing (tokens/s, MFU)
"""
