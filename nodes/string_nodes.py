"""ComfyUI's text nodes (``utils/string``): compare, search, cut and rewrite a STRING.

Prompt-building workflows chain these between a text source and CLIPTextEncode, so
their type names, inputs, choices and outputs are ComfyUI's (``comfy_extras/nodes_string.py``)
and each computes what ComfyUI's does. StringConcatenate, the first of the family,
lives in :mod:`nodes.primitives`.

One deliberate difference: where ComfyUI swallows a malformed regular expression
(RegexMatch answers False, RegexExtract an empty string) Kiln raises a NodeError
naming ``regex_pattern``, because a silent "no match" hides a typo that changes the
prompt; RegexReplace already fails in ComfyUI and fails here with the same reason.
A capture group that took part in no match gives "" rather than ComfyUI's None (which
a later text node cannot use, and which makes ComfyUI's "All Groups" crash).

Patterns run on the ``regex`` library (``re``'s syntax, and already installed with
transformers) for its time limit: a pattern that backtracks catastrophically (``(a|aa)+$``
on a long line of a's) would otherwise hold the worker, and with ``re`` the whole
process, since ``re`` matches without releasing the GIL. Each search, scan or
replacement gets :data:`REGEX_SECONDS` and runs with the GIL released; past the limit
the node fails naming ``regex_pattern``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import regex as re

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

CATEGORY = "utils/string"

CASE_MODES = ("UPPERCASE", "lowercase", "Capitalize", "Title Case")
TRIM_MODES = ("Both", "Left", "Right")
COMPARE_MODES = ("Starts With", "Ends With", "Equal")
EXTRACT_MODES = ("First Match", "All Matches", "First Group", "All Groups")
#: The time one regular-expression search, scan or replacement may take.
REGEX_SECONDS = 2.0
#: ``regex``'s keyword arguments for every match call: the time limit, and the GIL released.
LIMITS = {"timeout": REGEX_SECONDS, "concurrent": True}


def _text(name: str) -> Input:
    """A multiline text input without a default, as ComfyUI declares its string inputs."""
    return Input(name, T.STRING, multiline=True)


def _compile(pattern: str, case_insensitive: bool, multiline: bool, dotall: bool) -> re.Pattern[str]:
    """The pattern with the three flags ComfyUI's regex nodes offer; a bad one names its input."""
    flags = (re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0) \
        | (re.DOTALL if dotall else 0)
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise NodeError(f"regex_pattern is not a valid regular expression: {exc}", "regex_pattern") from exc


@contextlib.contextmanager
def _time_limit() -> Iterator[None]:
    """A pattern that runs past :data:`REGEX_SECONDS` is an error naming it, not a stuck worker."""
    try:
        yield
    except TimeoutError:
        raise NodeError(f"regex_pattern took more than {LIMITS['timeout']:g} s on this text and was stopped "
                        "(overlapping alternatives under a repeat, such as (a|aa)+, backtrack exponentially); "
                        "simplify the pattern",
                        "regex_pattern") from None


_REGEX_FLAG_INPUTS = [Input("case_insensitive", T.BOOLEAN, default=True),
                      Input("multiline", T.BOOLEAN, default=False),
                      Input("dotall", T.BOOLEAN, default=False)]


@define_node("StringSubstring", category=CATEGORY, display_name="Substring",
             inputs=[_text("string"), Input("start", T.INT), Input("end", T.INT)],
             outputs=[Output("STRING", T.STRING)])
def string_substring(ctx, string: str, start: int, end: int):
    """The characters from ``start`` up to, not including, ``end``: Python's slice, so a negative
    index counts from the end and an index past either end is clipped (as in ComfyUI)."""
    return (string[int(start):int(end)],)


@define_node("StringLength", category=CATEGORY, display_name="Length",
             inputs=[_text("string")], outputs=[Output("length", T.INT)])
def string_length(ctx, string: str):
    """How many characters (code points, not bytes) the text has."""
    return (len(string),)


@define_node("CaseConverter", category=CATEGORY, display_name="Case Converter",
             inputs=[_text("string"), Input("mode", T.COMBO, choices=CASE_MODES)],
             outputs=[Output("STRING", T.STRING)])
def case_converter(ctx, string: str, mode: str):
    """Upper, lower, first-letter-capital (the rest lowered) or every word capitalised."""
    convert = {"UPPERCASE": str.upper, "lowercase": str.lower,
               "Capitalize": str.capitalize, "Title Case": str.title}[mode]
    return (convert(string),)


@define_node("StringTrim", category=CATEGORY, display_name="Trim",
             inputs=[_text("string"), Input("mode", T.COMBO, choices=TRIM_MODES)],
             outputs=[Output("STRING", T.STRING)])
def string_trim(ctx, string: str, mode: str):
    """The text without the whitespace (spaces, tabs, newlines) at one or both ends."""
    trim = {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}[mode]
    return (trim(string),)


@define_node("StringReplace", category=CATEGORY, display_name="Replace",
             inputs=[_text("string"), _text("find"), _text("replace")],
             outputs=[Output("STRING", T.STRING)])
def string_replace(ctx, string: str, find: str, replace: str):
    """Every occurrence of ``find`` replaced, literally (no patterns; see RegexReplace)."""
    return (string.replace(find, replace),)


@define_node("StringContains", category=CATEGORY, display_name="Contains",
             inputs=[_text("string"), _text("substring"), Input("case_sensitive", T.BOOLEAN, default=True)],
             outputs=[Output("contains", T.BOOLEAN)])
def string_contains(ctx, string: str, substring: str, case_sensitive: bool = True):
    """Whether ``substring`` occurs in the text (an empty one always does)."""
    if not case_sensitive:
        string, substring = string.lower(), substring.lower()
    return (substring in string,)


@define_node("StringCompare", category=CATEGORY, display_name="Compare",
             inputs=[_text("string_a"), _text("string_b"), Input("mode", T.COMBO, choices=COMPARE_MODES),
                     Input("case_sensitive", T.BOOLEAN, default=True)],
             outputs=[Output("BOOLEAN", T.BOOLEAN)])
def string_compare(ctx, string_a: str, string_b: str, mode: str, case_sensitive: bool = True):
    """Whether ``string_a`` starts with, ends with, or equals ``string_b``."""
    if not case_sensitive:
        string_a, string_b = string_a.lower(), string_b.lower()
    test = {"Starts With": str.startswith, "Ends With": str.endswith, "Equal": str.__eq__}[mode]
    return (bool(test(string_a, string_b)),)


@define_node("RegexMatch", category=CATEGORY, display_name="Regex Match",
             inputs=[_text("string"), _text("regex_pattern"), *_REGEX_FLAG_INPUTS],
             outputs=[Output("matches", T.BOOLEAN)])
def regex_match(ctx, string: str, regex_pattern: str, case_insensitive: bool = True,
                multiline: bool = False, dotall: bool = False):
    """Whether the pattern matches anywhere in the text (a search, not a match at the start)."""
    pattern = _compile(regex_pattern, case_insensitive, multiline, dotall)
    with _time_limit():
        return (pattern.search(string, **LIMITS) is not None,)


def _group(match: re.Match[str], index: int) -> str | None:
    """Group ``index`` of a match ("" if it took no part), or None if the pattern has no such group."""
    if len(match.groups()) < index:
        return None
    return match.group(index) or ""


def extract(pattern: re.Pattern[str], string: str, mode: str, group_index: int) -> str:
    """RegexExtract's result; several results are joined by newlines.

    "All Matches" follows ComfyUI, which takes ``re.findall``'s items: the whole match
    when the pattern has no groups, otherwise each match's first group.
    """
    if mode == "First Match":
        found = pattern.search(string, **LIMITS)
        return found.group(0) if found else ""
    if mode == "All Matches":
        return "\n".join((m.group(1) if pattern.groups else m.group(0)) or ""
                         for m in pattern.finditer(string, **LIMITS))
    if mode == "First Group":
        found = pattern.search(string, **LIMITS)
        return (_group(found, group_index) or "") if found else ""
    picked = []
    for found in pattern.finditer(string, **LIMITS):
        # ComfyUI skips matches of a pattern without groups, even for group_index 0
        if pattern.groups and (value := _group(found, group_index)) is not None:
            picked.append(value)
    return "\n".join(picked)


@define_node("RegexExtract", category=CATEGORY, display_name="Regex Extract",
             inputs=[_text("string"), _text("regex_pattern"), Input("mode", T.COMBO, choices=EXTRACT_MODES),
                     *_REGEX_FLAG_INPUTS, Input("group_index", T.INT, default=1, min=0, max=100)],
             outputs=[Output("STRING", T.STRING)])
def regex_extract(ctx, string: str, regex_pattern: str, mode: str, case_insensitive: bool = True,
                  multiline: bool = False, dotall: bool = False, group_index: int = 1):
    """The first match, every match, or capture group ``group_index`` (0 = the whole match) of the
    first or of every match; several results one per line, "" when nothing matches."""
    pattern = _compile(regex_pattern, case_insensitive, multiline, dotall)
    with _time_limit():
        return (extract(pattern, string, mode, int(group_index)),)


@define_node("RegexReplace", category=CATEGORY, display_name="Regex Replace",
             inputs=[_text("string"), _text("regex_pattern"), _text("replace"),
                     Input("case_insensitive", T.BOOLEAN, default=True, optional=True),
                     Input("multiline", T.BOOLEAN, default=False, optional=True),
                     Input("dotall", T.BOOLEAN, default=False, optional=True,
                           tooltip="On: '.' also matches a newline. Off: it stops at line ends."),
                     Input("count", T.INT, default=0, min=0, max=100, optional=True,
                           tooltip="Maximum number of replacements to make; 0 replaces every match.")],
             outputs=[Output("STRING", T.STRING)])
def regex_replace(ctx, string: str, regex_pattern: str, replace: str, case_insensitive: bool = True,
                  multiline: bool = False, dotall: bool = False, count: int = 0):
    """Find and replace text using regex patterns; ``replace`` may name groups (\\1, \\g<name>)."""
    pattern = _compile(regex_pattern, case_insensitive, multiline, dotall)
    try:
        with _time_limit():
            return (pattern.sub(replace, string, count=int(count), **LIMITS),)
    except (re.error, IndexError) as exc:
        raise NodeError(f"replace is not a valid replacement (a group the pattern lacks, or a bad escape): {exc}",
                        "replace") from exc


@define_node("JsonExtractString", category=CATEGORY, display_name="Extract Text from JSON",
             inputs=[_text("json_string"), Input("key", T.STRING, default="")],
             outputs=[Output("STRING", T.STRING)])
def json_extract_string(ctx, json_string: str, key: str):
    """The value under ``key`` in the first valid JSON object in the text (one inside a Markdown code
    block or after other words too), as text: "" when there is no object or no such key (ComfyUI's rule,
    which templates rely on for a missing preset entry); a non-string value as Python writes it."""
    import json

    decoder = json.JSONDecoder()
    start = json_string.find("{")
    while start != -1:
        try:
            data, _ = decoder.raw_decode(json_string, start)
        except json.JSONDecodeError:
            start = json_string.find("{", start + 1)
            continue
        value = data.get(key) if isinstance(data, dict) else None
        return ("" if value is None else str(value),)
    return ("",)
