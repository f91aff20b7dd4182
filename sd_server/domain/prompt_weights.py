"""AUTOMATIC1111's attention syntax: ``(word:1.3)`` weighs a span 1.3, ``(word)`` multiplies by 1.1, ``[word]``
divides by 1.1, brackets nest, ``\\(`` is a literal bracket; a bracket left open weighs the rest of the prompt."""

import re
from typing import Any

ROUND, SQUARE = 1.1, 1 / 1.1  # what (...) and [...] multiply by
MIN_WEIGHT, MAX_WEIGHT = 0.0, 3.0  # a token's weight, brackets multiplied out (A1111 users write 0.1-2.0)
MAX_NESTING = 12  # brackets open at once: 1.1 ** 12 = 3.1 already passes MAX_WEIGHT

ATTENTION_TOKEN = re.compile(
    r"""
    \\[\\()\[\]]         # an escaped bracket or backslash: the character itself
    | \(|\[              # a bracket that opens
    | :\s*([+-]?[\d.]+)\s*\)  # ":1.3)", the weight of the round bracket it closes
    | \)|\]              # a bracket that closes
    | [^\\()\[\]:]+      # plain text
    | [\\:]              # a lone backslash or colon: plain text
    """,
    re.VERBOSE,
)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (text, weight) segments, neighbours of equal weight merged; unclosed brackets weigh the rest."""
    segments: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            segments.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(segments))
        elif token == "[":
            square_open.append(len(segments))
        elif weight is not None and round_open and is_number(weight):
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            segments.append([token, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return merged(segments)


def check_weights(text: str) -> None:
    """ValueError saying why, when ``text`` nests brackets deeper than MAX_NESTING or weighs a span outside
    MIN_WEIGHT..MAX_WEIGHT: such weights scale the text embedding past what the model can draw from (a black image)."""
    depth = deepest = 0
    for match in ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        if token in ("(", "["):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", ")") or match.group(1) is not None:
            depth = max(0, depth - 1)
        if deepest > MAX_NESTING:
            raise ValueError(f"brackets nest more than {MAX_NESTING} deep")
    for segment, weight in parse_attention(text):
        if segment.strip() and not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise ValueError(f"the weight of {segment.strip()[:40]!r} is {weight:.3g}; weights run from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}")


def is_number(text: str) -> bool:
    """True when ``text`` parses as a float."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def merged(segments: list[list[Any]]) -> list[tuple[str, float]]:
    """Neighbouring segments of equal weight joined; one empty segment for an empty prompt."""
    result: list[tuple[str, float]] = []
    for text, weight in segments:
        if result and result[-1][1] == weight:
            result[-1] = (result[-1][0] + text, weight)
        else:
            result.append((text, weight))
    return result or [("", 1.0)]


def is_plain(text: str) -> bool:
    """True when ``text`` carries no attention syntax (the pipeline may encode it as it is)."""
    return parse_attention(text) == [(text, 1.0)]


