"""The evaluation home: one task protocol, one runner, one backend protocol, one report (docs/evals.md).

    task      what to ask and how to score (runner.EvalTask): name, max_new_tokens, length(sample),
              prompts(batch) -> token ids (+ vision inputs), record(sample, response, ...) -> the stored dict
    runner    the one loop (runner.run): groups samples by (task, length), batches them under
              max_tokens_per_batch, pads each group to one shape, times each batch, scores through the task;
              runner.register / runner.TASKS is the registry
    backends  the model behind the runner: JaxBackend (the LWM engine, any mesh and attention_impl) and
              TorchBackend (a local Hugging Face causal LM); both greedy, answers cut before EOS
    report    records -> results JSON, grids, heatmaps, the summary table and RULER's effective length

The tasks:
    needle, needle_multi     the original LWM token protocol (needle.py; python -m lwm.eval_needle[_multi])
    niah_*, vt, cwe, fwe, coref   RULER-style text tasks fitted to token lengths (tasks.py, tasks_more.py,
                             vocab.py, haystack.py, suite.py; python -m lwm.eval_long)
    visual_needle            a number in one frame of a video, through the VQGAN (visual.py;
                             python -m lwm.eval_visual_needle)
The two single-needle families differ on purpose: `needle` is the original's token-exact protocol (its
JSON and figure are what the LWM paper reports), `niah_single_*` RULER's sentence-level one.

Add an eval: write a task (subclass runner.EvalTask; for a text task fitted to token lengths, tasks.Task
with make / oracle / random_answer); register it (runner.register(MyTask("name"))). A text task then runs in
`python -m lwm.eval_long --tasks=name`; any task runs with `runner.run(samples, backend, task)` and
`report.write_results`. Nothing else batches, pads, times or reports (tests/evals/test_runner.py).
"""
