"""`create_app(engine, tokenizer, ...) -> FastAPI app`: the OpenAI-compatible HTTP API over one engine.

    GET  /                      the chat page (static HTML; it calls the API below)
    GET  /health                {"status": "ok", "model": ..., "waiting": n, "running": n}
    GET  /v1/models             the one served model
    POST /v1/chat/completions   messages -> answer (stream=true: server-sent events ending with `data: [DONE]`)
    POST /v1/completions        prompt text (or token ids, or a batch of either) -> continuation
    POST /v1/images/generations vision models: text -> PNG images (b64_json)
    GET  /tokenizer_info        POST /tokenize, /detokenize: the served tokenizer, in vLLM's shapes (what
                                lm-evaluation-harness's remote tokenizer reads)

`n` choices are n jobs (choice i with seed s + i); `logprobs` come from the engine's decode state
(`Engine.step(..., logprobs=True)`), an echoed prompt's from `Engine.score` on the engine thread
(`Scheduler.call`); they are shaped by `lwm.serve.logprobs`.

Requests are validated at the edge (`lwm.serve.schemas`), turned into token ids by `lwm.serve.model.ServedModel`
(the chat template is `lwm.text.chat_template`), and queued on the `lwm.serve.scheduler.Scheduler`, whose one thread
runs the engine. Every error leaves as an OpenAI error object (`lwm.serve.errors`).
"""
from __future__ import annotations

import asyncio
import base64
import io
import itertools
import time
import uuid
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from lwm.serve.edge import Edge
from lwm.serve.errors import APIError, bad_request, install_handlers, internal_error, sse
from lwm.serve.jobs import Job, Sampling
from lwm.serve.logprobs import chat_logprobs, completion_logprobs, merge_completion
from lwm.serve.schemas import ChatCompletionRequest, CompletionRequest, ImageRequest, TokenizeRequest, \
    DetokenizeRequest


def create_app(engine, tokenizer, *, model_name: str = "lwm", vqgan=None, api_key: Optional[str] = None,
               max_batch_size: int = 8, max_queue: int = 64, allow_local_media: bool = False,
               max_n_frames: int = 8, default_max_tokens: int = 256, mesh=None, scheduler=None,
               decode_steps_per_call: int = 16, warmup_prompt_lengths=(), batch_wait_ms: float = 20.0,
               max_body_bytes: int = 32 << 20, body_timeout_s: float = 60.0, max_image_bytes: int = 1 << 27,
               max_video_pixels: int = 1 << 30, max_chars_per_token: int = 32, prefix_cache=None,
               prefill_chunk: Optional[int] = None, max_step_tokens: Optional[int] = None) -> FastAPI:
    """The app over `engine` (an `lwm.inference` engine, text or vision) and its `tokenizer`.

    model_name: the id clients send as `model`. vqgan: an `lwm.model.vqgan.VQGAN` for vision models (required
    for image input and image generation). api_key: when set, every path but `/` and `/health` (so /v1/*,
    /openapi.json, /docs) needs `Authorization: Bearer KEY` (401 otherwise, before the body is read).
    max_body_bytes: larger request bodies get 413 (Content-Length or counted while read); body_timeout_s: a
    body must arrive within this many seconds (408) (`lwm.serve.edge.Edge`). max_batch_size: rows decoded together; max_queue: requests waiting for the engine (429 when
    full). allow_local_media: read plain file paths in media parts. max_n_frames: frames taken from a
    video. max_image_bytes / max_video_pixels: media refused (400) from their header when an image decodes to
    more bytes / a video to more frames x width x height (`lwm.utils.vision_io`). max_chars_per_token: a text of
    more than this x max_sequence_length characters is a 400 before it is tokenized (`ServedModel.check_chars`).
    default_max_tokens: the
    budget of a request that sets none (capped by the context left).
    mesh: the device mesh the engine's arrays live on (its thread runs under `jax.set_mesh(mesh)`).
    decode_steps_per_call: decode steps per engine call while no request waits for a slot (one while some
    do, so they are admitted at the next step): fewer host round trips and server-sent events per token, at
    the cost of tokens reaching the client in groups of up to this many. The first token is not delayed (it
    comes from the prefill). warmup_prompt_lengths: prompt lengths whose shapes are compiled at start-up,
    before the app takes requests (`Scheduler._warmup`); others compile on first use. batch_wait_ms: how long
    an idle engine waits for the rest of a burst before prefilling (`Scheduler._gather`; 0 = never).
    prefix_cache: the server's one `lwm.inference.prefix_cache.PrefixCache` (`Engine.prefix_cache`; None: none):
    every prompt reuses the longest prefix it holds, and a response's usage.prompt_tokens_details.cached_tokens
    counts those tokens. prefill_chunk: tokens per prefill chunk (None: whole prompts, or the scheduler's default
    chunk with a prefix cache); max_step_tokens: decode plus prefill-chunk tokens per scheduler step (None: one
    chunk + max_batch_size): a long prompt's chunks share steps with the streams already answering
    (`lwm.serve.scheduler`).
    scheduler: a ready `Scheduler` (tests and benchmarks); by default one is built and started here and
    stopped at shutdown."""
    from contextlib import asynccontextmanager

    from lwm.serve.model import ServedModel
    from lwm.serve.scheduler import Scheduler

    served = ServedModel(engine, tokenizer, model_name, vqgan=vqgan, allow_local_media=allow_local_media,
                         max_n_frames=max_n_frames, max_image_bytes=max_image_bytes,
                         max_video_pixels=max_video_pixels, max_chars_per_token=max_chars_per_token)
    own = scheduler is None
    sched = scheduler or Scheduler(served, max_batch_size=max_batch_size, max_queue=max_queue, mesh=mesh,
                                   steps_per_call=decode_steps_per_call, warmup_prompt_lengths=warmup_prompt_lengths,
                                   batch_wait_s=batch_wait_ms / 1e3, prefix_cache=prefix_cache,
                                   prefill_chunk=prefill_chunk, max_step_tokens=max_step_tokens)
    seeds = itertools.count(int(time.time()))

    @asynccontextmanager
    async def lifespan(app):
        if own:
            sched.start()
        yield
        if own:
            sched.stop()

    app = FastAPI(title="LWM", version="0.2.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served, app.state.scheduler = served, sched
    install_handlers(app)
    app.add_middleware(Edge, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != served.name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {served.name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def sampling(req, prompt, seed=None) -> Sampling:
        budget = getattr(req, "max_completion_tokens", None) or req.max_tokens
        served.check_length(len(prompt), budget, "prompt" if isinstance(req, CompletionRequest) else "messages")
        if budget is None:
            budget = min(default_max_tokens, served.max_sequence_length - len(prompt))
        if seed is None:
            seed = req.seed if req.seed is not None else next(seeds)
        return Sampling(max_tokens=budget, temperature=req.temperature, top_p=req.top_p, seed=seed, stop=req.stop or [])

    def check_request(req, n_prompts: int) -> None:
        """400s of the request as a whole: streaming with what is returned in one body only; more jobs
        (prompts x n) than --max_queue could ever hold."""
        try:
            req.check_stream()
        except ValueError as e:
            raise bad_request(str(e), "stream") from None
        if n_prompts * req.n > sched.max_queue:
            raise bad_request(f"n={req.n} choices x {n_prompts} prompts = {n_prompts * req.n} generations, more "
                              f"than this server queues at once (--max_queue={sched.max_queue}); lower n or send "
                              "fewer prompts per request", "n")

    def choice_seeds(req, n: int) -> list:
        """Seeds of n choices: the request's folded seed s (or the server's counter), choice i s + i mod 2**32."""
        base = req.seed if req.seed is not None else next(seeds)
        return [(base + i) % 2 ** 32 for i in range(n)]

    def submit_all(jobs) -> None:
        """Queue every job, or none (a 429 cancels those already queued)."""
        queued = []
        try:
            for job in jobs:
                sched.submit(job)
                queued.append(job)
        except APIError:
            for job in queued:
                job.cancel()
            raise

    async def finish_all(request: Request, jobs) -> list:
        """Wait for queued jobs (a client that leaves cancels them all); their finish reasons."""
        async def watch():
            while not all(j.done.is_set() for j in jobs):
                if await request.is_disconnected():
                    for j in jobs:
                        j.cancel()
                    return
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        reasons = []
        try:
            for job in jobs:
                reason = None
                async for kind, value in job.events():
                    reason = value if kind == "done" else reason
                reasons.append(reason)
        except APIError:
            raise
        except Exception as e:
            raise internal_error(e, "generation") from None
        finally:
            watcher.cancel()
            for job in jobs:
                job.cancel()
        return reasons

    def usage_of(prompts, jobs) -> dict:
        """Usage of a request's jobs (n per prompt, in prompt order): each prompt counted once, its cached
        tokens those of its first choice."""
        n_prompt, n_new = sum(len(p) for p in prompts), sum(len(j.tokens) for j in jobs)
        per = len(jobs) // len(prompts) if jobs else 0
        cached = sum(jobs[i * per].cached_tokens for i in range(len(prompts))) if per else 0
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new,
                "prompt_tokens_details": {"cached_tokens": int(cached)}}

    def ids_of(req, prompt) -> dict:
        if not req.return_token_ids:
            return {}
        ids = prompt.ids if hasattr(prompt, "ids") else prompt
        return {"prompt_token_ids": [int(i) for i in ids]}

    # ------------------------------------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        html = resources.files("lwm.serve").joinpath("static/chat.html").read_text()
        return HTMLResponse(html)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "vision": served.is_vision, **sched.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return served.card()

    # ---------------------------------------------------------------------------- tokenizer (vLLM's API)
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return served.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        ids = await asyncio.to_thread(served.tokenize, req.prompt, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_sequence_length}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        return {"prompt": await asyncio.to_thread(served.detokenize, req.tokens)}

    # ------------------------------------------------------------------------------------- completions
    async def run(request: Request, job: Job, chunk, final, stream: bool, include_usage: bool):
        """Queue `job`; answer with one JSON body, or with server-sent events built by chunk(text) and
        final(reason) (and a usage chunk when asked)."""
        sched.submit(job)
        if stream:
            async def events():
                try:
                    yield sse(chunk(None))
                    async for kind, value in job.events():
                        yield sse(chunk(*value) if kind == "text" else final(value))
                    if include_usage:
                        yield sse({**final(None), "choices": [], "usage": job.usage()})
                except APIError as e:
                    yield sse(e.body())
                except Exception as e:                             # the engine failed: tell, then close
                    yield sse(internal_error(e, "generation").body())
                finally:
                    job.cancel()                                   # a client that left frees its slot
                yield sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        return (await finish_all(request, [job]))[0]             # a client that left frees its slot

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        check_request(req, 1)
        prompt = await asyncio.to_thread(served.chat_prompt, req.messages)
        extra = lambda ids: {"token_ids": list(ids)} if req.return_token_ids else {}
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.n > 1 or req.logprobs:
            loop, k = asyncio.get_running_loop(), req.top_logprobs or 0
            jobs = [Job(prompt, sampling(req, prompt, seed), tokenizer, loop, req.return_token_ids,
                        logprobs=bool(req.logprobs)) for seed in choice_seeds(req, req.n)]
            submit_all(jobs)
            reasons = await finish_all(request, jobs)
            choices = []
            for i, (job, reason) in enumerate(zip(jobs, reasons)):
                lp = (await asyncio.to_thread(chat_logprobs, tokenizer, job.tokens, job.token_logprobs, k)
                      if req.logprobs else None)
                choices.append({"index": i, "message": {"role": "assistant", "content": job.text},
                                "finish_reason": reason, "logprobs": lp, **extra(job.tokens)})
            return {"id": ident, "object": "chat.completion", "created": created, "model": served.name,
                    "choices": choices, "usage": usage_of([prompt], jobs), **ids_of(req, prompt)}
        job = Job(prompt, sampling(req, prompt), tokenizer, asyncio.get_running_loop(), req.return_token_ids)
        head = dict(id=ident, object="chat.completion.chunk", created=created, model=served.name)

        def chunk(text, ids=()):
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None, **extra(ids)}]}

        def final(reason):
            return {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}

        reason = await run(request, job, chunk, final, req.stream,
                           bool(req.stream_options and req.stream_options.include_usage))
        if req.stream:
            return reason
        return {"id": ident, "object": "chat.completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": reason, "logprobs": None, **extra(job.tokens)}],
                "usage": job.usage(), **ids_of(req, prompt)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        batch = req.prompts()
        check_request(req, len(batch))
        extra = lambda ids: {"token_ids": list(ids)} if req.return_token_ids else {}
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = dict(id=ident, object="text_completion", created=created, model=served.name)
        if len(batch) > 1 or req.n > 1 or req.logprobs is not None or req.max_tokens == 0:
            return await completions_batch(req, request, batch, head, extra)
        one = batch[0]                  # the one prompt (a text or ids), also when sent as a batch of one
        prompt = await asyncio.to_thread(served.completion_prompt, one)   # tokenized off the loop
        job = Job(prompt, sampling(req, prompt), tokenizer, asyncio.get_running_loop(), req.return_token_ids)
        echo = (one if isinstance(one, str) else tokenizer.decode(prompt)) if req.echo else ""

        def chunk(text, ids=()):
            text = echo if text is None else text
            return {**head, "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None,
                                         **extra(ids)}]}

        def final(reason):
            return {**head, "choices": [{"index": 0, "text": "", "finish_reason": reason, "logprobs": None}]}

        reason = await run(request, job, chunk, final, req.stream,
                           bool(req.stream_options and req.stream_options.include_usage))
        if req.stream:
            return reason
        return {**head, "choices": [{"index": 0, "text": echo + job.text, "finish_reason": reason,
                                     "logprobs": None, **extra(job.tokens)}], "usage": job.usage(),
                **ids_of(req, prompt)}

    async def completions_batch(req, request, batch, head, extra):
        """The one-body answer for a batch of prompts, n choices each, log-probabilities, echo (choice index
        prompt * n + i, as OpenAI orders them). max_tokens=0: no generation, the echoed prompt is the answer."""
        prompts = [await asyncio.to_thread(served.completion_prompt, p) for p in batch]
        loop, k = asyncio.get_running_loop(), req.logprobs or 0
        want = req.logprobs is not None
        jobs = []
        if req.max_tokens != 0:
            for prompt in prompts:
                jobs += [Job(prompt, sampling(req, prompt, seed), tokenizer, loop, req.return_token_ids,
                             logprobs=want) for seed in choice_seeds(req, req.n)]
        else:
            for prompt in prompts:
                served.check_length(len(prompt), 0, "prompt")
        submit_all(jobs)
        scored = None
        if req.echo and want:                       # the prompts' own log-probabilities, between decode steps
            try:
                scored = await sched.call(lambda: [served.engine.score([p])[0] for p in prompts])
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
        reasons = await finish_all(request, jobs) if jobs else []
        choices = []
        for p, (raw, prompt) in enumerate(zip(batch, prompts)):
            echo = (raw if isinstance(raw, str) else tokenizer.decode(prompt)) if req.echo else ""
            echo_lp = None
            if scored is not None:
                rows = list(zip(*scored[p]))
                echo_lp = await asyncio.to_thread(completion_logprobs, tokenizer, prompt, rows, k, 0, True)
            for i in range(req.n):
                if not jobs:
                    choices.append({"index": p * req.n + i, "text": echo, "finish_reason": "length",
                                    "logprobs": echo_lp})
                    continue
                job, reason = jobs[p * req.n + i], reasons[p * req.n + i]
                lp = None
                if want:
                    lp = merge_completion(echo_lp, await asyncio.to_thread(
                        completion_logprobs, tokenizer, job.tokens, job.token_logprobs, k, len(echo)))
                choices.append({"index": p * req.n + i, "text": echo + job.text, "finish_reason": reason,
                                "logprobs": lp, **extra(job.tokens)})
        out = {**head, "choices": choices, "usage": usage_of(prompts, jobs)}
        if req.return_token_ids:
            out["prompt_token_ids"] = [[int(i) for i in p] for p in prompts] if len(prompts) > 1 else \
                [int(i) for i in prompts[0]]
        return out

    # ------------------------------------------------------------------------------------------ images
    @app.post("/v1/images/generations")
    async def images(req: ImageRequest):
        check_model(req.model)
        prompts = await asyncio.to_thread(served.check_image_request, req)       # ids, off the engine thread
        seed = req.seed if req.seed is not None else next(seeds)
        frames = await sched.call(lambda: served.generate_images(prompts, req.n, seed=seed,
                                                                 temperature=req.temperature, top_k=req.top_k,
                                                                 cfg_scale=req.cfg_scale))
        data = []
        for frame in frames:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            data.append({"b64_json": base64.b64encode(buf.getvalue()).decode(), "revised_prompt": None})
        return JSONResponse({"created": int(time.time()), "data": data})

    return app
