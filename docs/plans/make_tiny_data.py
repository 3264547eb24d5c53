"""The files docs/plans/tiny_cpu.yaml reads, written to OUT (default outputs/tiny_extend_data), in seconds on
a CPU: a synthetic haystack (haystack.jsonl: documents of common words), a sentencepiece tokenizer trained on
it (tokenizer.model), the training curriculum (train.jsonl: needle examples in the needle eval's template
mixed with plain passages) and short held-out text (heldout.jsonl). Built with lwm.demo's builders
(make_tokenizer, write_curriculum), the ones the offline demo uses.

    python docs/plans/make_tiny_data.py outputs/tiny_extend_data
    python -m lwm.extend --plan=docs/plans/tiny_cpu.yaml --data_dir=outputs/tiny_extend_data
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

WORDS = ("time market people idea startup money work company reason question problem answer river house "
         "thing world school friend night letter garden window paper city number year story water light").split()


def documents(n_docs: int, sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(sentences)) + "\n" for _ in range(n_docs)]


def make(out: str) -> str:
    from lwm import demo

    os.makedirs(out, exist_ok=True)
    haystack, train_docs, held = documents(12, 400, 0), documents(8, 200, 1), documents(8, 20, 2)
    with open(os.path.join(out, "haystack.jsonl"), "w") as f:         # the needle gate's haystack
        f.writelines(json.dumps({"text": d}) + "\n" for d in haystack)
    with open(os.path.join(out, "heldout.jsonl"), "w") as f:          # the held-out loss gate's short text
        f.writelines(json.dumps({"text": d}) + "\n" for d in held)
    tok = demo.make_tokenizer(train_docs, os.path.join(out, "tokenizer.model"), 400)
    stream = [t for d in train_docs for t in tok.encode(d)]
    demo.write_curriculum(os.path.join(out, "train.jsonl"), stream, tok, 400, (50, 1500), 0.5, seed=0,
                          progress=False)
    return out


if __name__ == "__main__":
    print(make(sys.argv[1] if len(sys.argv) > 1 else os.path.join("outputs", "tiny_extend_data")))
