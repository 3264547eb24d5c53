"""Scoring rules of the synthetic tasks (RULER's string-match rule, written here).

match_all(response, answers): 100 x the fraction of the answers found in the response, case-insensitive.
    match_all("The numbers are 8848 and 4321.", ["8848", "1234"]) == 50.0
    match_all("MEADOW, lamp", ["meadow", "lamp"]) == 100.0
Every task scores with it (a task's docstring restates it with its own worked example); the response is the
generated text up to the first EOS, never the prompt.
"""
from __future__ import annotations

from typing import Sequence


def match_all(response: str, answers: Sequence[str]) -> float:
    """100 * (answers contained in response, case-insensitive) / len(answers); 0.0 for no answers."""
    if not answers:
        return 0.0
    text = response.lower()
    return 100.0 * sum(a.lower() in text for a in answers) / len(answers)
