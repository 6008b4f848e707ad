"""ComfyUI's utils/string nodes (nodes/string_nodes.py): declarations as ComfyUI's, results worked out
by hand, bad patterns named."""
from __future__ import annotations

import pytest

from engine.context import Environment, NodeError
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from nodes import string_nodes as sn

CTX = None  # the string nodes never touch their context


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def test_declarations_follow_comfyui(registry):
    names = ["StringSubstring", "StringLength", "CaseConverter", "StringTrim", "StringReplace", "StringContains",
             "StringCompare", "RegexMatch", "RegexExtract", "RegexReplace"]
    for name in names:
        spec = registry.get(name)
        assert spec is not None and spec.signature_mismatches() == [] and spec.category == "utils/string"
    info = {name: registry.get(name).object_info() for name in names}
    assert info["StringSubstring"]["input"]["required"]["start"] == ["INT"]  # ComfyUI gives no default or range
    assert info["StringLength"]["output_name"] == ["length"]
    assert info["StringContains"]["output_name"] == ["contains"]
    assert info["RegexMatch"]["output_name"] == ["matches"]
    assert info["StringCompare"]["output"] == ["BOOLEAN"]
    assert info["StringCompare"]["input"]["required"]["mode"][0] == ["Starts With", "Ends With", "Equal"]
    assert info["CaseConverter"]["input"]["required"]["mode"][0] == ["UPPERCASE", "lowercase", "Capitalize",
                                                                     "Title Case"]
    extract = info["RegexExtract"]
    assert extract["input_order"]["required"] == ["string", "regex_pattern", "mode", "case_insensitive", "multiline",
                                                  "dotall", "group_index"]
    assert extract["input"]["required"]["group_index"] == ["INT", {"default": 1, "min": 0, "max": 100}]
    replace = info["RegexReplace"]
    assert replace["input_order"] == {"required": ["string", "regex_pattern", "replace"],
                                      "optional": ["case_insensitive", "multiline", "dotall", "count"]}
    assert replace["input"]["optional"]["count"][1]["max"] == 100
    assert registry.get("StringTrim").display_name == "Trim"


def test_plain_text_nodes():
    assert sn.string_substring(CTX, "landscape", 4, 9) == ("scape",)
    assert sn.string_substring(CTX, "landscape", -5, -1) == ("scap",)
    assert sn.string_substring(CTX, "abc", 1, 99) == ("bc",)
    assert sn.string_length(CTX, "héllo\n") == (6,)
    assert sn.case_converter(CTX, "a RED barn", "UPPERCASE") == ("A RED BARN",)
    assert sn.case_converter(CTX, "a RED barn", "lowercase") == ("a red barn",)
    assert sn.case_converter(CTX, "a RED barn", "Capitalize") == ("A red barn",)
    assert sn.case_converter(CTX, "a RED barn", "Title Case") == ("A Red Barn",)
    assert sn.string_trim(CTX, " \t x y \n", "Both") == ("x y",)
    assert sn.string_trim(CTX, " \t x y \n", "Left") == ("x y \n",)
    assert sn.string_trim(CTX, " \t x y \n", "Right") == (" \t x y",)
    assert sn.string_replace(CTX, "a.b.c", ".", "::") == ("a::b::c",)  # literal, not a pattern


def test_contains_and_compare_respect_case():
    assert sn.string_contains(CTX, "A Red Barn", "red", True) == (False,)
    assert sn.string_contains(CTX, "A Red Barn", "red", False) == (True,)
    assert sn.string_contains(CTX, "x", "", True) == (True,)
    assert sn.string_compare(CTX, "Portrait of", "portrait", "Starts With", True) == (False,)
    assert sn.string_compare(CTX, "Portrait of", "portrait", "Starts With", False) == (True,)
    assert sn.string_compare(CTX, "photo.PNG", ".png", "Ends With", False) == (True,)
    assert sn.string_compare(CTX, "photo.PNG", ".png", "Ends With", True) == (False,)
    assert sn.string_compare(CTX, "abc", "ABC", "Equal", False) == (True,)
    assert sn.string_compare(CTX, "abc", "abcd", "Equal", False) == (False,)


def test_regex_match_flags():
    assert sn.regex_match(CTX, "a CAT sat", r"cat", True, False, False) == (True,)
    assert sn.regex_match(CTX, "a CAT sat", r"cat", False, False, False) == (False,)
    text = "line one\nline two"
    assert sn.regex_match(CTX, text, r"^line two$", True, False, False) == (False,)
    assert sn.regex_match(CTX, text, r"^line two$", True, True, False) == (True,)
    assert sn.regex_match(CTX, text, r"one.line", True, False, False) == (False,)
    assert sn.regex_match(CTX, text, r"one.line", True, False, True) == (True,)


def test_regex_extract_modes():
    text = "w=512 h=768 w=1024"
    two_groups = r"(\w)=(\d+)"
    assert sn.regex_extract(CTX, text, r"\d+", "First Match") == ("512",)
    assert sn.regex_extract(CTX, text, r"\d+", "All Matches") == ("512\n768\n1024",)
    # ComfyUI takes findall's items: with groups, each match's first group
    assert sn.regex_extract(CTX, text, two_groups, "All Matches") == ("w\nh\nw",)
    assert sn.regex_extract(CTX, text, two_groups, "First Group", group_index=2) == ("512",)
    assert sn.regex_extract(CTX, text, two_groups, "First Group", group_index=0) == ("w=512",)
    assert sn.regex_extract(CTX, text, two_groups, "First Group", group_index=3) == ("",)  # no third group
    assert sn.regex_extract(CTX, text, two_groups, "All Groups", group_index=2) == ("512\n768\n1024",)
    assert sn.regex_extract(CTX, text, r"\d+", "All Groups", group_index=0) == ("",)  # no groups: ComfyUI skips
    assert sn.regex_extract(CTX, "ab", r"(x)?b", "All Groups", group_index=1) == ("",)  # group took no part
    assert sn.regex_extract(CTX, text, r"z+", "First Match") == ("",)
    assert sn.regex_extract(CTX, "W=1", r"w=(\d)", "First Group", case_insensitive=False) == ("",)


def test_regex_replace_count_and_groups():
    assert sn.regex_replace(CTX, "a1b22c333", r"\d+", "#") == ("a#b#c#",)
    assert sn.regex_replace(CTX, "a1b22c333", r"\d+", "#", count=2) == ("a#b#c333",)
    assert sn.regex_replace(CTX, "size 512x768", r"(\d+)x(\d+)", r"\2x\1") == ("size 768x512",)
    assert sn.regex_replace(CTX, "Cat cat", r"cat", "dog", case_insensitive=False) == ("Cat dog",)


@pytest.mark.parametrize("call", [
    lambda: sn.regex_match(CTX, "x", "(unclosed"),
    lambda: sn.regex_extract(CTX, "x", "[a-", "First Match"),
    lambda: sn.regex_replace(CTX, "x", "*x", "y"),
])
def test_a_bad_pattern_names_its_input(call):
    with pytest.raises(NodeError) as err:
        call()
    assert err.value.input_name == "regex_pattern" and "regular expression" in str(err.value)


@pytest.mark.parametrize("call", [
    lambda text: sn.regex_match(CTX, text, r"(a|aa)+$"),
    lambda text: sn.regex_extract(CTX, text, r"(a|aa)+$", "All Groups"),
    lambda text: sn.regex_replace(CTX, text, r"(a|aa)+$", "x"),
])
def test_a_pattern_that_backtracks_forever_is_stopped_and_named(call, monkeypatch):
    """Overlapping alternatives under a repeat on 40 a's and a b take exponentially many steps: the
    time limit stops them (here a short one, so the test stays quick) and the error names the
    pattern."""
    import time

    monkeypatch.setitem(sn.LIMITS, "timeout", 0.2)
    start = time.monotonic()
    with pytest.raises(NodeError) as err:
        call("a" * 40 + "b")
    assert err.value.input_name == "regex_pattern" and "stopped" in str(err.value)
    assert time.monotonic() - start < 20


def test_a_bad_replacement_names_its_input():
    with pytest.raises(NodeError) as err:
        sn.regex_replace(CTX, "abc", r"(b)", r"\2")
    assert err.value.input_name == "replace"


def test_a_chain_runs_through_the_executor(registry, tmp_path):
    doc = {"version": 1, "nodes": {
        "1": {"type": "PrimitiveString", "inputs": {"value": "  photo of a cat, 4k  "}},
        "2": {"type": "StringTrim", "inputs": {"string": ["1", 0], "mode": "Both"}},
        "3": {"type": "RegexReplace", "inputs": {"string": ["2", 0], "regex_pattern": r",\s*4k$", "replace": ""}},
        "4": {"type": "CaseConverter", "inputs": {"string": ["3", 0], "mode": "Title Case"}},
        "5": {"type": "PreviewAny", "inputs": {"source": ["4", 0]}},
        "6": {"type": "StringLength", "inputs": {"string": ["4", 0]}},
        "7": {"type": "PreviewAny", "inputs": {"source": ["6", 0]}}}}
    outcome = Executor(registry, Environment.for_folder(tmp_path)).run(parse(doc))
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["5"] == {"text": ["Photo Of A Cat"]}
    assert outcome.outputs["7"] == {"text": ["14"]}
