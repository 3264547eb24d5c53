"""Long-context evaluation beyond one needle (docs/evals.md).

  vocab, haystack   words / numbers / UUIDs / made-up words; filler sentences (noise, essays)
  tasks, tasks_more the tasks (needle variants; variable tracking, word extraction, co-reference), each with
                    its scoring rule, an oracle and a random answerer
  suite             the task table and samples fitted to token lengths with the chat template
  runner, backends  batched generation and scoring; the LWM JAX engine and Hugging Face PyTorch paths
  report            JSON, plots, the summary table and the effective length
  visual            the visual needle for the vision-language model
Entry points: `python -m lwm.eval_long`, `python -m lwm.eval_visual_needle`.
"""
