"""Scoring rules of the synthetic tasks (RULER's string-match rule, written here).

match_all(response, answers): 100 x the fraction of the answers found in the response, case-insensitive.
    match_all("The numbers are 8848 and 4321.", ["8848", "1234"]) == 50.0
    match_all("MEADOW, lamp", ["meadow", "lamp"]) == 100.0
choice_score(response, choices, answer): 100 when the choice of a closed answer set named first in the
    response (whole words, case-insensitive) is the answer, else 0; for questions with an answer set (the
    synthetic world's QA, lwm.evals.world; the ordering and counting needles, lwm.evals.visual).
    choice_score("It is blue, not red", ["red", "green", "blue"], "red") == 0.0
Every task scores with one of them (a task's docstring restates its rule with its own worked example); the
response is the generated text up to the first EOS, never the prompt.
"""
from __future__ import annotations

import re
from typing import Sequence


def match_all(response: str, answers: Sequence[str]) -> float:
    """100 * (answers contained in response, case-insensitive) / len(answers); 0.0 for no answers."""
    if not answers:
        return 0.0
    text = response.lower()
    return 100.0 * sum(a.lower() in text for a in answers) / len(answers)


def choice_score(response: str, choices: Sequence[str], answer: str) -> float:
    """100.0 when the choice occurring first in `response` (whole words, case-insensitive) is `answer`,
    else 0.0 (no choice in it: 0.0). Worked examples in lwm.evals.world's docstring."""
    text = response.lower()
    found = []
    for c in choices:
        m = re.search(r"(?<!\w)" + re.escape(c.lower()) + r"(?!\w)", text)
        if m:
            found.append((m.start(), -len(c), c))
    return 100.0 if found and min(found)[2] == answer else 0.0
