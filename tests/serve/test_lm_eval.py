"""lm-evaluation-harness against the server: its `local-completions` model (log-likelihood, a multiple-choice
task; and generation, a generate_until task, which it sends as a batch of one prompt) and its
`local-chat-completions` model (generation) on a tiny local task
(tests/support/lm_eval_tiny: questions in a JSONL file, task YAMLs; nothing downloaded), and its scores equal
the engine's own on the same examples.

The golds are set from the engine: half the examples take the engine's own pick (the likeliest choice, the
greedy answer), half another one, so the score is 0.5 exactly when the harness ranks and reads every example
as the engine does (0 or 1 could come from a constant model). Each example's log-likelihoods and answers are
also compared one by one; controls: the engine's scores of the same texts with BOS prepended (what a text
prompt gets) and its answers without the chat template differ from the harness's, so the comparisons see
the exact tokens."""
import json
import pathlib

import numpy as np
import pytest

from support.serving import running_server

import lm_eval  # noqa: F401  (the `test` extra installs it, .ci/run; missing, the file fails loudly)

TASKS = pathlib.Path(__file__).parents[1] / "support" / "lm_eval_tiny"
QUESTIONS = [json.loads(line) for line in (TASKS / "questions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def server(text_engine):
    from lwm.serve import create_app

    app = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", max_batch_size=4,
                     batch_wait_ms=0)
    with running_server(app) as url:
        yield dict(url=url, **text_engine)


def write_task(tmp_path, name: str, rows: list) -> None:
    """tmp_path/<name>.jsonl of rows, and the task YAML with its data file and a datasets cache in tmp_path."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (TASKS / f"{name}.yaml").read_text()
    text = text.replace("DATA_FILE", str(data)).replace("CACHE_DIR", str(tmp_path / "datasets_cache"))
    (tmp_path / f"{name}.yaml").write_text(text)


def evaluate(tmp_path, model: str, url: str, task: str, **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=dict(model="tiny", base_url=url, max_retries=1, **kw),
                           tasks=[task], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                           log_samples=True,
                           num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0, **({"apply_chat_template": True} if "chat" in model else {}))


def encode_pair(tok, context: str, continuation: str):
    """lm-evaluation-harness's split (`LM._encode_pair` of a causal model): trailing spaces of the context move
    to the continuation; the continuation's ids are what encoding the whole adds after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def loglikelihood(engine, ctx, cont) -> float:
    """The engine's log-likelihood of `cont` after `ctx` (`Engine.score`: entry t scores token t + 1)."""
    return float(engine.score([ctx + cont])[0].logprob[len(ctx) - 1:].sum())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_local_completions_loglikelihood_equals_the_engines(server, tmp_path):
    engine, tok = server["engine"], server["tok"]
    ref, picks = [], []
    for q in QUESTIONS:
        pairs = [encode_pair(tok, f"Question: {q['question']}\nAnswer:", " " + c) for c in q["choices"]]
        scores = [loglikelihood(engine, ctx, cont) for ctx, cont in pairs]
        ref.append(scores)
        picks.append(int(np.argmax(scores)))
    assert all(len(set(np.round(s, 4))) == len(s) for s in ref)       # no ties: the pick is the engine's
    golds = [p if i % 2 == 0 else (p + 1) % len(q["choices"]) for i, (p, q) in enumerate(zip(picks, QUESTIONS))]
    write_task(tmp_path, "mc", [{**q, "gold": g} for q, g in zip(QUESTIONS, golds)])

    out = evaluate(tmp_path, "local-completions", server["url"] + "/v1/completions", "lwm_tiny_mc",
                   tokenizer_backend="remote", tokenized_requests=True)
    assert out["results"]["lwm_tiny_mc"]["acc,none"] == 0.5
    samples = sorted(out["samples"]["lwm_tiny_mc"], key=lambda s: s["doc_id"])
    got = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # control: the same texts scored after BOS (a text prompt's ids) give other numbers
    with_bos = [[loglikelihood(engine, [tok.bos_id] + ctx, cont) for ctx, cont in
                 (encode_pair(tok, f"Question: {q['question']}\nAnswer:", " " + c) for c in q["choices"])]
                for q in QUESTIONS]
    assert not np.allclose(got, with_bos, atol=1e-4)


def test_local_chat_completions_generation_equals_the_engines(server, tmp_path):
    from lwm.inference.sampling import SamplingConfig
    from lwm.text.chat_template import conversation_ids

    engine, tok = server["engine"], server["tok"]

    def answers(prompts):
        out = engine.generate(prompts, 6, sampling=SamplingConfig()).tokens
        return [tok.decode(ids).split(".")[0] for ids in out]          # the task's `until: ["."]`

    ref = answers([conversation_ids(tok, [{"role": "user", "content": q["question"]}]) for q in QUESTIONS])
    assert len(set(ref)) > 1                                             # the answers tell the questions apart
    golds = [a if i % 2 == 0 else a + " x" for i, a in enumerate(ref)]
    write_task(tmp_path, "gen", [{"question": q["question"], "answer": g} for q, g in zip(QUESTIONS, golds)])

    out = evaluate(tmp_path, "local-chat-completions", server["url"] + "/v1/chat/completions", "lwm_tiny_gen")
    assert out["results"]["lwm_tiny_gen"]["exact_match,none"] == 0.5
    samples = sorted(out["samples"]["lwm_tiny_gen"], key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] for s in samples]
    assert got == ref
    # control: the same questions without the chat template answer otherwise
    plain = answers([[tok.bos_id] + tok.encode(q["question"]) for q in QUESTIONS])
    assert plain != got


def test_local_completions_generation_equals_the_engines(server, tmp_path):
    """generate_until through local-completions: the harness sends each context's ids (no BOS) as a batch of one
    prompt; its answers equal the engine's greedy answers to the same ids, cut at the task's '.'."""
    from lwm.inference.sampling import SamplingConfig

    engine, tok = server["engine"], server["tok"]
    out = engine.generate([tok.encode(q["question"]) for q in QUESTIONS], 6, sampling=SamplingConfig()).tokens
    ref = [tok.decode(ids).split(".")[0] for ids in out]
    golds = [a if i % 2 == 0 else a + " x" for i, a in enumerate(ref)]
    write_task(tmp_path, "gen", [{"question": q["question"], "answer": g} for q, g in zip(QUESTIONS, golds)])
    out = evaluate(tmp_path, "local-completions", server["url"] + "/v1/completions", "lwm_tiny_gen",
                   tokenizer_backend="remote", tokenized_requests=True)
    assert out["results"]["lwm_tiny_gen"]["exact_match,none"] == 0.5
    got = [s["resps"][0][0] for s in sorted(out["samples"]["lwm_tiny_gen"], key=lambda s: s["doc_id"])]
    assert got == ref
