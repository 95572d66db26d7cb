"""mkdocs hook that renders the formulas into MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) wraps each formula written as ``$...$`` or ``$$...$$``,
in the pages and in the docstrings that mkdocstrings renders, in an element of class
``arithmatex`` holding ``\\(...\\)`` or ``\\[...\\]``. This hook replaces that LaTeX with the
MathML that ``latex2mathml`` produces, which browsers display natively: the site loads no
script to typeset its formulas and reads the same offline.

MathML Core, which Chromium implements, ignores ``mathvariant`` other than ``normal``, so
letters such as ``\\mathbb R``, ``\\mathcal A`` and ``\\mathbf 1`` are written as the Unicode
characters of their alphabet (ℝ, 𝒜, 𝟏) instead.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import cache
from typing import Any

from latex2mathml.converter import convert

FORMULA = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', flags=re.DOTALL)
DELIMITERS = {"span": ("\\(", "\\)", "inline"), "div": ("\\[", "\\]", "block")}
# Operators latex2mathml does not know, rewritten into what it renders: "arg min" upright.
ARG = re.compile(r"\\arg(?![A-Za-z])(?:\s*\\(min|max)(?![A-Za-z]))?")
# A command latex2mathml left as text, such as "\\foo" inside <mi>: the build fails on it.
UNKNOWN_COMMAND = re.compile(r"<m[io][^>]*>\\[A-Za-z]+")
VARIANT = re.compile(r'<(mi|mn) mathvariant="([a-z-]+)">(.)</\1>')
# Unicode's names of the alphabets that mathvariant values stand for.
ALPHABETS = {
    "double-struck": "DOUBLE-STRUCK",
    "script": "SCRIPT",
    "fraktur": "FRAKTUR",
    "bold": "BOLD",
    "bold-italic": "BOLD ITALIC",
    "sans-serif": "SANS-SERIF",
    "monospace": "MONOSPACE",
}


@cache
def _character(variant: str, character: str) -> str | None:
    """The Unicode character for ``character`` (a Latin or Greek letter, or a digit) in the
    alphabet ``variant``, if there is one."""
    alphabet = ALPHABETS.get(variant)
    if alphabet is None:
        return None
    # "LATIN CAPITAL LETTER R" -> "CAPITAL R", "GREEK SMALL LETTER ALPHA" -> "SMALL ALPHA",
    # "DIGIT ONE" stays.
    name = unicodedata.name(character, "")
    name = name.replace("LATIN ", "").replace("GREEK ", "").replace("LETTER ", "")
    # A few characters (ℝ, ℬ, ℭ...) were encoded before the mathematical alphabets, without
    # "MATHEMATICAL" in their names.
    for full in (f"MATHEMATICAL {alphabet} {name}", f"{alphabet} {name}"):
        try:
            return unicodedata.lookup(full)
        except KeyError:
            continue
    return None


def _plain_characters(mathml: str) -> str:
    def replace(match: re.Match) -> str:
        tag, variant, character = match.groups()
        plain = _character(variant, character)
        return f"<{tag}>{plain}</{tag}>" if plain else match.group(0)

    return VARIANT.sub(replace, mathml)


def to_mathml(tag: str, body: str, where: str) -> str:
    """The MathML of one formula that arithmatex wrapped in ``<tag>``, with its delimiters."""
    opening, closing, display = DELIMITERS[tag]
    latex = html.unescape(body).strip()
    if not (latex.startswith(opening) and latex.endswith(closing)):
        raise ValueError(f"Unexpected formula {latex!r} in {where}.")
    source = ARG.sub(
        lambda m: r"\mathrm{arg" + (rf"\,{m.group(1)}" if m.group(1) else "") + "}",
        latex[len(opening) : -len(closing)].strip(),
    )
    mathml = convert(source, display=display)
    if "<merror" in mathml or UNKNOWN_COMMAND.search(mathml):
        raise ValueError(f"latex2mathml cannot render {latex!r} in {where}: {mathml}")
    return f'<{tag} class="arithmatex">{_plain_characters(mathml)}</{tag}>'


def on_page_content(content: str, page: Any, config: Any, files: Any) -> str:
    where = page.file.src_uri
    return FORMULA.sub(lambda match: to_mathml(match.group(1), match.group(2), where), content)
