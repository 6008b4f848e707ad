"""ComfyUI's prompt emphasis syntax: text -> (piece, weight) segments, plus what looked wrong.

The rules (ComfyUI's ``comfy/sd1_clip.py``, which workflows are written against):

* ``(text)`` multiplies the weight of ``text`` by 1.1; nesting multiplies again,
  so ``((text))`` is 1.21.
* ``(text:1.5)`` gives the group the weight 1.5. The number is what follows the
  *last* colon inside the group; it replaces the group's weight rather than
  multiplying the outer one, while groups nested inside still multiply it
  (``((a):1.5)`` weights ``a`` 1.65, ``((a:1.5))`` weights it 1.5).
* ``\\(`` and ``\\)`` are literal parentheses that group nothing.
* A group whose text after the last colon is no number keeps the colon as text
  and has weight 1.1 (``(style: anime)``); a colon first in the group is text too.
* Unbalanced parentheses are not an error: whatever the group structure cannot
  explain is encoded as written, with the parentheses as characters. An unclosed
  ``(`` makes the rest of the prompt literal; a stray ``)`` makes the text after it
  literal up to where the parentheses balance again (exactly what ComfyUI does,
  so a workflow gives the same conditioning in both).

Kiln follows these rules to the letter so that shared workflows and prompts give
the same conditioning, and adds what ComfyUI does silently: a message for each
unbalanced parenthesis and each weight it could not read. A weight that is not
finite (``nan``, ``inf``) is refused (ComfyUI would encode NaNs); the group then
keeps its text and the 1.1 emphasis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Escaped parentheses are kept as these two-character units while parsing.
_ESCAPED = {"\\(": "(", "\\)": ")"}
EMPHASIS = 1.1


@dataclass(frozen=True)
class Segment:
    text: str
    weight: float


@dataclass
class Parsed:
    segments: list[Segment]
    #: Human-readable notes on text that was encoded literally.
    problems: list[str] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return any(s.weight != 1.0 for s in self.segments)


def _units(text: str) -> list[str]:
    """Characters, with ``\\(`` and ``\\)`` kept as one unit each so they never group."""
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in _ESCAPED:
            out.append(pair)
            i += 2
        else:
            out.append(text[i])
            i += 1
    return out


def _join(units: list[str]) -> str:
    return "".join(_ESCAPED.get(u, u) for u in units)


def _top_level(units: list[str]) -> list[list[str]]:
    """Split into plain runs and ``( ... )`` groups at depth 0, by ComfyUI's depth rule:
    a ``(`` opens a group only at depth 0, a ``)`` closes one only when it brings the
    depth back to 0; anything else (including parentheses below depth 0) is text."""
    items: list[list[str]] = []
    current: list[str] = []
    depth = 0
    for u in units:
        if u == "(":
            if depth == 0:
                if current:
                    items.append(current)
                current = []
            current.append(u)
            depth += 1
        elif u == ")":
            depth -= 1
            current.append(u)
            if depth == 0:
                items.append(current)
                current = []
        else:
            current.append(u)
    if current:
        items.append(current)
    return items


def _weight_of(inner: list[str]) -> tuple[float | None, int, str]:
    """(explicit weight or None, index of its colon, why it was not read or "")."""
    colon = max((i for i, u in enumerate(inner) if u == ":"), default=-1)
    if colon < 0:
        return None, -1, ""
    tail = inner[colon + 1:]
    if "(" in tail or ")" in tail:  # the colon belongs to a nested group: no weight here, nothing wrong
        return None, -1, ""
    number = _join(tail)
    if colon == 0:
        return None, -1, "nothing before ':'"
    try:
        value = float(number)
    except ValueError:
        return None, -1, f"{number.strip()!r} after ':' is not a number"
    if not math.isfinite(value):
        return None, -1, f"{number.strip()!r} is not a finite weight"
    return value, colon, ""


def _walk(units: list[str], weight: float, out: list[Segment], problems: list[str]) -> None:
    for item in _top_level(units):
        if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
            inner = item[1:-1]
            group_weight = weight * EMPHASIS
            value, colon, why = _weight_of(inner)
            if value is not None:
                group_weight, inner = value, inner[:colon]
            elif why:
                problems.append(f"'{_join(item)}': {why}; the text is kept as written, weight {group_weight:.3g}")
            _walk(inner, group_weight, out, problems)
        else:
            out.append(Segment(_join(item), weight))


def _balance_problems(units: list[str]) -> list[str]:
    """Where the parentheses do not balance (positions count characters of the prompt)."""
    problems, opened, depth, pos = [], [], 0, 0
    for u in units:
        if u == "(":
            opened.append(pos)
            depth += 1
        elif u == ")":
            depth -= 1
            if opened:
                opened.pop()
            else:
                problems.append(f"unmatched ')' at character {pos + 1}: the parentheses after it up to the point "
                                "where they balance again are kept as text")
        pos += len(u)
    for start in opened[:1]:
        problems.append(f"unclosed '(' at character {start + 1}: the prompt from there on is kept as text "
                        "(write \\( for a literal parenthesis)")
    return problems


def parse(text: str) -> Parsed:
    """Segments of ``text`` with their weights, in order; empty pieces are dropped."""
    units = _units(text)
    problems = _balance_problems(units)
    segments: list[Segment] = []
    _walk(units, 1.0, segments, problems)
    return Parsed([s for s in segments if s.text], problems)
