"""`lwm.serve` under the hostile and careless requests of issue 27, one at a time, on loopback: each request's
status, seconds and the server's RSS after it (and the most it reached meanwhile), then idle RSS vs peak.

    python benchmarks/serve_hostile_bench.py                 # CPU, ~1-2 min (10 s of it makes the mp4)
    python benchmarks/serve_hostile_bench.py --skip_video    # without the 1,500-frame mp4

Hardware: any CPU (2 cores are enough); the model is the tiny vision-language preset with random weights, so
the figures are the server's own costs, not a model's. Expected: 401 for the 200 MB body without the key and
413 with it, both in well under a second and with no growth of the server's memory; 400 for the 16-bit
9000 x 9000 PNG, the 1,500-frame 1080p mp4, the 20 MB completions prompt, the out-of-int64 seed, the lone
surrogate and NaN; 200 for seeds -1 and 2**40, neutral penalties and the well-formed neighbours sent beside
them; peak RSS (VmHWM) within some tens of MB of the idle RSS (issue 27 measured 545 MB -> 8.9 GB before).

Setup: the server is `python benchmarks/serve_hostile_bench.py --child` in a subprocess (create_app over the
tiny `VisionLLaMAConfig` preset with host-drawn random weights, the tiny VQGAN and a 400-piece sentencepiece
tokenizer, served by uvicorn with `lwm.serve.edge.server_config`, i.e. the flags' defaults: 32 MB body cap,
128 MiB image budget, 2**30-pixel video budget, 32 characters per token), with an API key. Memory is read
from /proc/PID/status (VmRSS now, VmHWM the peak since start) or psutil where /proc is absent; a sampler
thread polls VmRSS every 10 ms while a request runs. A pickle is not a server input (the server never
unpickles what a client sends): that case is covered by tests/utils/test_safe_pickle_bounds.py, not here.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

KEY = "hostile-bench-key"
MODEL = "bench"


# ------------------------------------------------------------------------------------------------ the server
def child(port: int, ready_file: str) -> None:
    """The server process: tiny vision-language model behind create_app on 127.0.0.1:port."""
    import numpy as np
    import uvicorn

    from lwm.inference.engine import Engine
    from lwm.inference.loader import random_params
    from lwm.model.shapes import param_shapes
    from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM
    from lwm.model.vqgan import VQGAN, VQGANConfig
    from lwm.serve import create_app
    from lwm.serve.edge import server_config
    from lwm.text.tokenizer import train_sentencepiece

    cfg = VisionLLaMAConfig.load("tiny").replace(max_sequence_length=512, sample_mode="text")
    model = VisionLLaMAForCausalLM(cfg)
    params = random_params(param_shapes(cfg), cfg)
    words = "the quick brown fox jumps over a lazy dog while world models read long videos".split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_sentencepiece([" ".join(rng.choice(words, rng.integers(2, 30))) for _ in range(400)],
                                  f"{tmp}/t.model", 400)
    engine = Engine(model, params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    vqgan = VQGAN.load(None, VQGANConfig.load("tiny"), seed=0)
    app = create_app(engine, tok, model_name=MODEL, vqgan=vqgan, api_key=KEY, max_batch_size=4)
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port))
    threading.Thread(target=lambda: (_wait(lambda: server.started, 600), open(ready_file, "w").close()),
                     daemon=True).start()
    server.run()


def _wait(cond, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process pid in bytes: /proc/PID/status, else psutil (rss, and rss again for the peak,
    which psutil does not give on every platform)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10
    except (OSError, KeyError):
        import psutil

        rss = psutil.Process(pid).memory_info().rss
        return rss, rss


class Sampler:
    """Polls the server's VmRSS every 10 ms in a thread; `peak()` is the most seen since the last reset."""

    def __init__(self, pid: int):
        self.pid, self.most, self.overall, self.stop = pid, 0, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self.most = max(self.most, memory(self.pid)[0])
            self.overall = max(self.overall, self.most)
            time.sleep(0.01)

    def reset(self) -> None:
        self.most = memory(self.pid)[0]


# ---------------------------------------------------------------------------------------------- the requests
def post(port: int, path: str, body, key: bool = True, timeout: float = 120.0) -> tuple[int, str]:
    """(status, the error message or '') of one POST; body: a dict or a str sent as it is (surrogatepass)."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode("utf-8", "surrogatepass")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {KEY}"} if key else {})}
    try:
        conn.request("POST", path, data, headers)
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    try:
        return r.status, (json.loads(raw).get("error") or {}).get("message", "")
    except ValueError:
        return r.status, raw[:120].decode("utf-8", "replace")


def huge_body(port: int, n_bytes: int, key: bool, chunked: bool = False, deadline_s: float = 60.0) -> tuple[int, str]:
    """Send a chat body of n_bytes (declared by Content-Length, or chunked) 1 MB at a time until the server
    answers or closes, at most deadline_s; (status, first bytes of the answer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=deadline_s)
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    head += [f"Authorization: Bearer {KEY}"] if key else []
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {n_bytes}"]
    chunk = b"a" * (1 << 20)
    end, sent = time.monotonic() + deadline_s, 0
    try:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        s.setblocking(False)
        while sent < n_bytes and time.monotonic() < end:
            try:
                if s.recv(1, socket.MSG_PEEK):          # the server answered: stop sending
                    break
            except BlockingIOError:
                pass
            piece = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") if chunked else chunk
            try:
                s.setblocking(True)
                s.settimeout(max(0.1, end - time.monotonic()))
                s.sendall(piece)
                s.setblocking(False)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                break
            sent += len(chunk)
        s.setblocking(True)
        s.settimeout(max(1.0, end - time.monotonic()))
        answer = b""
        while b"\r\n" not in answer:
            got = s.recv(4096)
            if not got:
                break
            answer += got
    except (ConnectionResetError, BrokenPipeError, socket.timeout) as e:
        return 0, f"connection ended: {type(e).__name__}"
    finally:
        s.close()
    line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    return (int(line.split()[1]) if len(line.split()) > 1 else 0), f"{line} after {sent / 2**20:.0f} MB sent"


def png_16bit(width: int, height: int) -> bytes:
    """A 16-bit grey PNG of width x height, all zeros (as tests/serve/test_media_budgets.py::_png builds it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + width * 2)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def mp4_many_frames(path: str, n_frames: int = 1500, width: int = 1920, height: int = 1080,
                    deadline_s: float = 90.0):
    """The issue's clip: n_frames black 1080p frames in H.264 (about 83 KB); None (with the reason) when PyAV
    is missing or encoding passes deadline_s."""
    try:
        import av
        import numpy as np
    except ImportError as e:
        return None, f"PyAV not installed ({e})"
    end = time.monotonic() + deadline_s
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "ultrafast", "crf": "40"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        for _ in range(n_frames):
            if time.monotonic() > end:
                return None, f"encoding {n_frames} frames took over {deadline_s:.0f} s"
            frame.pts = None
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with open(path, "rb") as f:
        return f.read(), ""


def chat(content, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready_file", default="")
    p.add_argument("--skip_video", action="store_true", help="skip the 1,500-frame mp4 (about 10 s to encode)")
    args = p.parse_args(argv)
    if args.child:
        return child(args.port, args.ready_file)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="hostile_bench_")
    ready = os.path.join(tmp, "ready")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", f"--port={port}",
                             f"--ready_file={ready}"], env=env)
    try:
        t0 = time.perf_counter()
        if not _wait(lambda: os.path.exists(ready) or proc.poll() is not None, 600) or proc.poll() is not None:
            raise SystemExit(f"the server did not start (exit status {proc.poll()})")
        print(f"server pid {proc.pid} on 127.0.0.1:{port}, up in {time.perf_counter() - t0:.1f} s", flush=True)
        run(port, proc.pid, tmp, args)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(port: int, pid: int, tmp: str, args) -> None:
    # warm-up: compile the prefill/decode shapes and one image prompt, so idle memory is the serving memory
    for _ in range(2):
        assert post(port, "/v1/chat/completions", chat("hello world"))[0] == 200
    tiny_png = base64.b64encode(png_16bit(32, 32)).decode()
    image_part = lambda b64, mime="image/png": {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}}
    status = post(port, "/v1/chat/completions", chat([{"type": "text", "text": "what is it"}, image_part(tiny_png)]))
    assert status[0] == 200, status
    with concurrent.futures.ThreadPoolExecutor(8) as pool:      # the batch shapes of the seeds' group below
        for _ in range(2):
            assert all(f.result()[0] == 200 for f in [pool.submit(post, port, "/v1/completions", {
                "model": MODEL, "prompt": p, "max_tokens": 4}) for p in ["hello world"] * 7 + ["hi"]])
    time.sleep(1.0)
    idle_rss, idle_hwm = memory(pid)
    sampler = Sampler(pid)

    big_png = png_16bit(9000, 9000)
    print(f"16-bit 9000 x 9000 PNG: {len(big_png) / 1e3:.0f} KB", flush=True)
    if args.skip_video:
        video, why = None, "--skip_video"
    else:
        t = time.perf_counter()
        video, why = mp4_many_frames(os.path.join(tmp, "clip.mp4"))
        if video is not None:
            print(f"1,500-frame 1080p mp4: {len(video) / 1e3:.0f} KB, made in {time.perf_counter() - t:.1f} s",
                  flush=True)
    good = lambda: post(port, "/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 4})

    cases = [
        ("200 MB body, no key", 401, lambda: huge_body(port, 200 << 20, key=False)),
        ("200 MB body, key", 413, lambda: huge_body(port, 200 << 20, key=True)),
        ("200 MB body, key, chunked", 413, lambda: huge_body(port, 200 << 20, key=True, chunked=True)),
        ("16-bit 9000x9000 PNG data URL", 400, lambda: post(port, "/v1/chat/completions", chat(
            [{"type": "text", "text": "what is it"}, image_part(base64.b64encode(big_png).decode())]))),
    ]
    if video is not None:
        cases.append(("mp4 1,500 frames 1080p", 400, lambda: post(port, "/v1/chat/completions", chat(
            [{"type": "text", "text": "what is it"},
             {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video).decode()}}]))))
    cases += [
        ("20 MB completions prompt", 400, lambda: post(port, "/v1/completions",
                                                       {"model": MODEL, "prompt": "x" * 20_000_000, "max_tokens": 4})),
        ("lone surrogate in a message", 400, lambda: post(port, "/v1/chat/completions",
                                                          json.dumps(chat("a\ud800b"), ensure_ascii=True))),
        ("NaN temperature", 400, lambda: post(port, "/v1/completions",
                                              '{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL)),
        ("frequency_penalty 0 (neutral)", 200, lambda: post(port, "/v1/completions", {
            "model": MODEL, "prompt": "hi", "max_tokens": 4, "frequency_penalty": 0, "presence_penalty": 0})),
    ]
    print()
    print(f"{'request':<40} {'want':>4} {'got':>4} {'seconds':>8} {'RSS after MB':>13} {'RSS peak MB':>12}  message")
    rows_ok = True

    def report(name, want, status, message, seconds):
        nonlocal rows_ok
        rss = memory(pid)[0]
        sampler.most = max(sampler.most, rss)
        rows_ok &= status == want
        print(f"{name:<40} {want:>4} {status:>4} {seconds:>8.3f} {rss / 2**20:>13.0f} {sampler.most / 2**20:>12.0f}  "
              f"{message[:90]}", flush=True)

    for name, want, fn in cases:
        sampler.reset()
        t = time.perf_counter()
        status, message = fn()
        report(name, want, status, message, time.perf_counter() - t)

    # seeds beside well-formed neighbours, all at once (the issue: -1 or >= 2**32 failed its batch)
    seeded = [("seed -1", 200, {"seed": -1}), ("seed 2**40", 200, {"seed": 2 ** 40}),
              ("seed 2**63 (outside int64)", 400, {"seed": 2 ** 63})]
    sampler.reset()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        t = time.perf_counter()
        futures = [(name, want, pool.submit(post, port, "/v1/completions",
                                            {"model": MODEL, "prompt": "hello world", "max_tokens": 4, **extra}))
                   for name, want, extra in seeded]
        futures += [(f"  neighbour {i} (beside the seeds)", 200, pool.submit(good)) for i in range(4)]
        for name, want, f in futures:
            status, message = f.result()
            report(name, want, status, message, time.perf_counter() - t)
    sampler.reset()
    t = time.perf_counter()
    status, message = good()
    report("well-formed request after all", 200, status, message, time.perf_counter() - t)
    sampler.stop.set()

    rss, hwm = memory(pid)
    print()
    print(f"server idle RSS {idle_rss / 2**20:.0f} MB (peak so far, start-up and compiles included: "
          f"{idle_hwm / 2**20:.0f} MB); after the hostile requests RSS {rss / 2**20:.0f} MB, "
          f"peak (VmHWM) {hwm / 2**20:.0f} MB, most sampled during them {sampler.overall / 2**20:.0f} MB")
    print("mp4 skipped: " + why if video is None else "", end="\n" if video is None else "")
    print("pickle: skipped, not a server input (the server never unpickles client data); see tests/utils/test_safe_pickle_bounds.py")
    print("all statuses as expected" if rows_ok else "SOME STATUSES DIFFER FROM THE EXPECTED ONES")


if __name__ == "__main__":
    main()
