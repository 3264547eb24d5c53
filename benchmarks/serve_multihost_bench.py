"""What the server across hosts adds to each engine call: one lwm.parallel.multihost.broadcast_bytes of the call's
message (docs/serve.md, "Across hosts"), timed over two processes on this machine (loopback, CPU, gloo).

    python benchmarks/serve_multihost_bench.py                  # 200 messages of each size
    python benchmarks/serve_multihost_bench.py --n=50 --sizes=300,30000   # bytes

Prints, per message size in bytes, the median and p95 milliseconds of one broadcast as process 0 sees it. The
default sizes are the messages' own (lwm.serve.replicated.encode): a decode step's 160 bytes, a 300-token
prompt's prefill 1,499 bytes, a 32K-token prompt's 216,783 bytes. The 2-core workplace machine under other
jobs' load (load average ~15): about 2 ms for the small ones, 6 ms for the 32K prompt.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def child(pid: int, port: int, n: int, sizes: list) -> None:
    import jax
    import numpy as np

    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    from lwm.parallel.multihost import broadcast_bytes

    for size in sizes:
        blob = bytes(range(256)) * (size // 256) + bytes(size % 256)
        broadcast_bytes(blob if pid == 0 else None)                  # compile this size's buffers
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            got = broadcast_bytes(blob if pid == 0 else None)
            times.append(time.perf_counter() - t0)
            assert got == blob
        if pid == 0:
            ms = np.sort(np.asarray(times)) * 1e3
            print(f"{size:>8} bytes: median {np.median(ms):6.2f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:6.2f} ms "
                  f"({n} broadcasts)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--sizes", default="160,1499,216783")
    parser.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child >= 0:
        child(args.child, args.port, args.n, sizes)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, __file__, f"--child={pid}", f"--port={port}", f"--n={args.n}",
                               f"--sizes={args.sizes}"], env=env,
                              stdout=None if pid == 0 else subprocess.DEVNULL) for pid in range(2)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
