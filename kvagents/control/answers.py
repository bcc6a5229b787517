"""Answer parsers: the final answer of a generated text, as a normalised string (or ``None``).

Every parser takes any input and never raises on it: text without a recognisable answer, truncated LaTeX, or
a non-string gives ``None``. Answers are normalised so that equal answers compare equal as strings (majority
vote) and so that a gold answer passed through the same normaliser can be compared with ``==``.

* :func:`parse_gsm8k`: ``#### N``, else ``Answer: N`` / ``The answer is N`` (case-insensitive), else the last
  number of the text; the number goes through :func:`normalize_number`.
* :func:`parse_boxed`: MATH's ``\\boxed{...}`` (nested braces; the last complete one), through
  :func:`normalize_math`.
* :func:`parse_choice`: a multiple-choice letter (``Answer: C``, ``(C)``, ``C.`` at the start, ...).
* :func:`get_parser`: one of them by name (``"gsm8k"``, ``"math"``, ``"choice"``).

Example:
    >>> parse_gsm8k("She makes 9 * 2 = $18 a day.\\n#### 18")
    '18'
    >>> parse_boxed(r"so the answer is $\\boxed{\\frac{14}{3}}$.")
    '\\\\frac{14}{3}'
    >>> parse_choice("The answer is (C) department store.")
    'C'
    >>> normalize_number("$1,450,000.00")
    '1450000'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal

__all__ = [
    "PARSERS",
    "get_parser",
    "normalize_math",
    "normalize_number",
    "parse_boxed",
    "parse_choice",
    "parse_gsm8k",
]

Parser = Callable[[str], "str | None"]

# ----------------------------------------------------------------------------------------------------------------
# Numbers

_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"(\d*)(?:\.(\d*))?")
_FRACTION = re.compile(r"(\d+)\s*/\s*(\d+)")
#: A number inside free text: optional sign (not after a word character or ')': "16-3" is 16 and 3), optional
#: "$", thousands groups or plain digits, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-−+])?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?!\.\d))?")


def normalize_number(s: object) -> str | None:
    """A canonical string for a number, or ``None`` when ``s`` is not one.

    Removes ``$`` / ``\\$``, ``%`` / ``\\%``, surrounding spaces, a trailing sentence period, a leading ``+``,
    thousands separators (``1,450,000``; a comma anywhere else makes it not a number), leading zeros and trailing
    fractional zeros (``18.00`` -> ``18``, ``2.50`` -> ``2.5``); ``-0`` -> ``0``; ``−`` (U+2212) is a minus.
    Fractions ``a/b`` are kept as written (only spaces and a ``+`` sign removed), not reduced or evaluated.
    Python ints and finite floats are accepted (``18.0`` -> ``'18'``); anything else gives ``None``.

    Example:
        >>> [normalize_number(x) for x in ["$1,234.50", "+7", "18.", "50%", "-3/4", "1,2", "abc"]]
        ['1234.5', '7', '18', '50', '-3/4', None, None]
    """
    if isinstance(s, bool) or s is None:
        return None
    if isinstance(s, int):
        return str(s)
    if isinstance(s, float):
        if not math.isfinite(s):
            return None
        s = format(Decimal(repr(s)), "f")
    if not isinstance(s, str):
        return None
    t = s.strip().replace("−", "-")
    for junk in ("\\$", "$", "\\%", "%"):
        t = t.replace(junk, "")
    t = t.strip()
    if t.endswith(".") and not t.endswith(".."):
        t = t[:-1].rstrip()
    sign = ""
    if t[:1] in ("+", "-"):
        sign = "-" if t[0] == "-" else ""
        t = t[1:].lstrip()
    if not t:
        return None
    m = _FRACTION.fullmatch(t)
    if m:
        return f"{sign}{m.group(1)}/{m.group(2)}"
    if "," in t:
        if not _THOUSANDS.fullmatch(t):
            return None
        t = t.replace(",", "")
    m = _DECIMAL.fullmatch(t)
    if not m or not (m.group(1) or m.group(2)):
        return None
    whole = m.group(1).lstrip("0") or "0"
    frac = (m.group(2) or "").rstrip("0")
    out = whole + (f".{frac}" if frac else "")
    if out == "0":
        return "0"
    return sign + out


def _first_number(text: str) -> str | None:
    for m in _NUMBER.finditer(text):
        v = normalize_number(m.group(0))
        if v is not None:
            return v
    return None


def _last_number(text: str) -> str | None:
    for m in reversed(list(_NUMBER.finditer(text))):
        v = normalize_number(m.group(0))
        if v is not None:
            return v
    return None


# ----------------------------------------------------------------------------------------------------------------
# GSM8K

_HASHES = re.compile(r"####")
#: "Answer:", "answer is", "answer is:", "**Answer:**", "Final answer:", "The answer is" (case-insensitive).
_ANSWER_MARK = re.compile(r"\banswer\b(?:\s*\*\*)?\s*(?:is\b\s*:?|[:：=])", re.IGNORECASE)


def _answer_line(text: str, end: int) -> str:
    """The text after a marker up to the end of its line (or the next non-empty line when that one is empty)."""
    rest = text[end:].lstrip(" \t*")
    if rest.startswith(("\n", "\r")):
        rest = rest.lstrip()
    return rest.split("\n", 1)[0]


def parse_gsm8k(text: object) -> str | None:
    """The numeric answer of a GSM8K-style solution, normalised by :func:`normalize_number`, or ``None``.

    Rules, in order:

    1. ``#### N``: the first ``####`` followed by a number (the GSM8K reference format; the *first*, because small
       models often go on to write a new question and answer after theirs).
    2. ``Answer: N``, ``The answer is N``, ``answer is: N``, ``**Answer:** N`` (case-insensitive): the first such
       marker whose line holds a number; on that line, the first number after its last ``=`` (``The answer is
       16 - 3 - 4 = 9`` -> ``9``), else the first number.
    3. ``\boxed{N}``: the first number in the last complete box holding one (Qwen models box their answer even
       when asked for ``Answer:``; ``pay \boxed{80} for the 16 glasses`` -> ``80``).
    4. The last number of the text.

    Example:
        >>> parse_gsm8k("16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars. The answer is $18.")
        '18'
        >>> parse_gsm8k("I cannot tell.") is None
        True
    """
    if not isinstance(text, str) or not text:
        return None
    for m in _HASHES.finditer(text):
        rest = text[m.end() :].lstrip(" \t#*:")
        m2 = _NUMBER.match(rest)
        if m2:
            v = normalize_number(m2.group(0))
            if v is not None:
                return v
    for m in _ANSWER_MARK.finditer(text):
        line = _answer_line(text, m.end())
        tail = line.rsplit("=", 1)[-1] if "=" in line else line
        v = _first_number(tail)
        if v is not None:
            return v
    for m in reversed(list(_BOXED.finditer(text))):
        content = _boxed_content(text, m.end())
        v = _first_number(_TEXT_WRAP.sub(r"\1", content)) if content is not None else None
        if v is not None:
            return v
    return _last_number(text)


# ----------------------------------------------------------------------------------------------------------------
# MATH

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start``; ``None`` if its braces never close."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # escaped char, e.g. \{ or \}
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def normalize_math(s: object) -> str | None:
    """A light canonical form of a MATH answer (applied by :func:`parse_boxed`; apply it to gold answers too).

    A plain number goes through :func:`normalize_number`. Otherwise: surrounding ``$`` and a trailing period
    dropped, ``\\text{x}`` / ``\\mathrm{x}`` / ``\\mbox{x}`` unwrapped, ``\\left`` / ``\\right``, spacing commands
    (``\\!``, ``\\,``, ``\\;``, ``\\:``) and degree marks (``^\\circ``) removed, ``\\dfrac`` / ``\\tfrac`` ->
    ``\\frac``, all whitespace removed; a result that is a plain number is normalised as one. No symbolic
    equivalence (``\\frac{1}{2}`` and ``0.5`` stay different). Empty or non-string -> ``None``.

    Example:
        >>> normalize_math(r"\\dfrac{14}{3}"), normalize_math(r"90^\\circ"), normalize_math(r"6 - 5i")
        ('\\\\frac{14}{3}', '90', '6-5i')
    """
    if not isinstance(s, str):
        return normalize_number(s) if isinstance(s, (int, float)) else None
    num = normalize_number(s)
    if num is not None:
        return num
    t = s.strip().strip("$").strip()
    for _ in range(3):  # nested wrappers
        t = _TEXT_WRAP.sub(r"\1", t)
    t = _DEGREES.sub("", t)
    for cmd in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:"):
        t = t.replace(cmd, "")
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    t = "".join(t.split()).rstrip(".")
    if not t:
        return None
    num = normalize_number(t)
    return num if num is not None else t


def parse_boxed(text: object) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed N``) in ``text``,
    normalised by :func:`normalize_math`; nested and escaped braces are handled. A box whose braces never close
    (a truncated generation) is skipped in favour of an earlier complete one; no complete box -> ``None``.

    Example:
        >>> parse_boxed(r"First \\boxed{3}, then $\\boxed{\\sqrt{51}}$ and \\boxed{1")
        '\\\\sqrt{51}'
    """
    if not isinstance(text, str):
        return None
    for m in reversed(list(_BOXED.finditer(text))):
        content = _boxed_content(text, m.end())
        if content is not None:
            v = normalize_math(content)
            if v is not None:
                return v
    return None


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice

_CHOICE_MARK = re.compile(
    r"\b(?:answer|choice|option)\b(?:\s*\*\*)?\s*(?:is\b\s*:?|[:：])\s*(?:\*\*)?\s*(?:(?:option|choice)\s+)?",
    re.IGNORECASE,
)


def _check_letters(letters: str) -> str:
    if (
        not isinstance(letters, str)
        or not letters
        or not all("A" <= c <= "Z" for c in letters.upper())
        or len(set(letters.upper())) != len(letters)
    ):
        raise ValueError(f"letters must be distinct ASCII letters like 'ABCDE', got {letters!r}")
    return letters.upper()


def parse_choice(text: object, letters: str = "ABCDE") -> str | None:
    """The chosen option letter (upper case) of a multiple-choice answer, or ``None``.

    Rules, in order (only letters in ``letters`` count; a bare letter must be upper case, a parenthesised one may
    be lower case):

    1. After ``answer`` / ``choice`` / ``option`` followed by ``:`` or ``is`` (case-insensitive; ``**`` bold
       allowed): ``Answer: C``, ``The answer is (C)``, ``The correct option is C.``, ``**Answer:** (c)``;
       the first such marker followed by a letter.
    2. A letter at the very start: ``C``, ``C.``, ``C)``, ``(C)``, ``C:`` (``A bank`` is not a letter answer),
       unless the text holds several distinct ``(X)`` letters (the options restated).
    3. Parenthesised letters anywhere: if exactly one distinct letter appears as ``(X)``, that one; several
       (e.g. the options restated) -> ``None``.

    ``letters`` that are not distinct ASCII letters raise ``ValueError`` (a configuration error, not bad text).

    Example:
        >>> parse_choice("B) library"), parse_choice("answer: (d)"), parse_choice("(A) bank (B) library")
        ('B', 'D', None)
    """
    letters = _check_letters(letters)
    if not isinstance(text, str) or not text.strip():
        return None
    upper = f"[{letters}]"
    paren = f"[{letters}{letters.lower()}]"
    after_mark = re.compile(rf"(?:[(\[]\s*({paren})\s*[)\]]|({upper})(?![A-Za-z0-9]))")
    for m in _CHOICE_MARK.finditer(text):
        m2 = after_mark.match(text, m.end())
        if m2:
            return (m2.group(1) or m2.group(2)).upper()
    found = {x.upper() for x in re.findall(rf"\(\s*({paren})\s*\)", text)}
    start = text.lstrip(" \t\r\n*#>")
    m = re.match(rf"(?:\(\s*({paren})\s*\)|({upper})(?:[.):\]]|\s*$|\s*\n))", start)
    if m and len(found) <= 1:
        return (m.group(1) or m.group(2)).upper()
    if len(found) == 1:
        return found.pop()
    return None


# ----------------------------------------------------------------------------------------------------------------

PARSERS: dict[str, Parser] = {"gsm8k": parse_gsm8k, "math": parse_boxed, "choice": parse_choice}


def get_parser(name: str | Parser) -> Parser:
    """The parser called ``name`` (``"gsm8k"``, ``"math"``, ``"choice"``; case-insensitive); a callable is
    returned unchanged. An unknown name raises ``ValueError`` listing the known ones.

    Example:
        >>> get_parser("gsm8k")("#### 42")
        '42'
    """
    if callable(name):
        return name
    if isinstance(name, str) and name.lower() in PARSERS:
        return PARSERS[name.lower()]
    raise ValueError(
        f"unknown answer parser {name!r}; known parsers: {', '.join(repr(k) for k in sorted(PARSERS))} "
        "(or pass a callable text -> str | None)"
    )
