"""Sampling through the engine over two processes of two CPU devices each (`python -m lwm.text_chat` with the
--jax_distributed.* flags, --mesh_dim=2,1,1,2, ring attention with the KV cache sharded over sp across the
processes) prints the same answer as one process with four devices: temperature 2 and top-p 0.95, so the
per-row random draws must agree as well as the logits. Both processes print it. (The needle eval over the
same layout: tests/evals/test_needle_multihost.py.)"""
import subprocess
import sys

import pytest

from support import cpu_subprocess_env, free_port

FLAGS = ["--load_llama_config=tiny", "--mesh_dim=2,1,1,2", "--update_llama_config=dict(attention_impl='ring')",
         "--max_new_tokens=12", "--temperature=2.0", "--top_p=0.95", "--stream=False",
         "--prompt=What is the special magic number?"]


@pytest.mark.slow
def test_two_processes_sample_what_one_process_samples(golden_workdir):
    d = golden_workdir
    flags = FLAGS + [f"--load_checkpoint=params::{d}/params", f"--tokenizer={d}/tokenizer.model"]
    cmd = [sys.executable, "-m", "lwm.text_chat", *flags, "--seed=3"]
    single = subprocess.run(cmd, env=cpu_subprocess_env(d, 4), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    head = "ASSISTANT: "                                        # lwm.text_chat's label, then the answer
    assert single.stdout.startswith(head) and len(single.stdout.strip()) > len(head)

    port, procs = free_port(), []
    for pid in range(2):
        dist = ["--jax_distributed.initialize_jax_distributed=True",
                f"--jax_distributed.coordinator_address=127.0.0.1:{port}", "--jax_distributed.num_processes=2",
                f"--jax_distributed.process_id={pid}"]
        procs.append(subprocess.Popen(cmd + dist, env=cpu_subprocess_env(d, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    # Gloo (the CPU collectives) prints "[Gloo] Rank i is connected to ..." lines to stdout from several threads
    # while the answer is generated, and they interleave mid-line; the answer is written after them in one
    # piece (--stream=False), so each process's stdout is "ASSISTANT: ", those lines, then the answer.
    answer = single.stdout[len(head):]
    for out, _ in outputs:
        assert out.startswith(head) and out.endswith(answer), (out, single.stdout)
        between = out[len(head):len(out) - len(answer)]
        assert not between or between.startswith("[Gloo]"), between          # nothing but Gloo's lines
    # Negative control: another seed draws another answer (the comparison can fail).
    other = subprocess.run([*cmd[:-1], "--seed=4"], env=cpu_subprocess_env(d, 4), capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 0 and other.stdout != single.stdout
