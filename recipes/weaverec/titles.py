"""Display form of item titles: un-inverted articles and an optional release year.

MovieLens (and many catalogues) sort titles by moving a leading article to the end: ``"Matrix, The (1999)"``,
``"Cité des enfants perdus, La"``, ``"Appartement, L'"``. A language model has read these titles the natural way
round, so prompts and candidates read better as ``"The Matrix (1999)"``. :func:`display_title` un-inverts the
article of the main title and of every parenthesised alternative title, and keeps or drops a trailing four-digit
year. It changes text only: item identity stays the item id.
"""

from __future__ import annotations

import re

#: Articles that catalogues move to the end of a title (English, French, Italian, Spanish, German, ...).
ARTICLES: tuple[str, ...] = (
    "The", "A", "An", "Les", "La", "Le", "L'", "Il", "Lo", "Gli", "Das", "Der", "Die", "Den", "Det",
    "El", "Los", "Las", "Un", "Une", "Una", "Uno",
)
_INVERTED = re.compile(r"^(?P<body>.+?),\s+(?P<art>" + "|".join(re.escape(a) for a in ARTICLES) + r")\s*$")
_YEAR = re.compile(r"\s*\((?P<year>\d{4})\)\s*$")


def uninvert(segment: str) -> str:
    """``"Matrix, The"`` -> ``"The Matrix"``; ``"Appartement, L'"`` -> ``"L'Appartement"``; others unchanged."""
    m = _INVERTED.match(segment.strip())
    if not m:
        return segment.strip()
    art, body = m.group("art"), m.group("body").strip()
    return f"{art}{body}" if art.endswith("'") else f"{art} {body}"


def _split_parentheses(text: str) -> list[str]:
    """Main title, then each top-level ``(...)`` group's inner text, in order (unbalanced text stays in place)."""
    parts, depth, start, main_end = [], 0, 0, None
    for i, ch in enumerate(text):
        if ch == "(":
            if depth == 0:
                if main_end is None:
                    main_end = i
                start = i + 1
            depth += 1
        elif ch == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                parts.append(text[start:i])
    if depth != 0 or main_end is None:
        return [text]
    return [text[:main_end], *parts]


def display_title(title: str, *, uninvert_articles: bool = True, keep_year: bool = True) -> str:
    """The title as shown to the model (see the module docstring)."""
    text = title.strip()
    year = ""
    m = _YEAR.search(text)
    if m:
        year, text = m.group("year"), text[: m.start()]
    if uninvert_articles:
        parts = _split_parentheses(text)
        if len(parts) == 1:
            text = uninvert(parts[0])
        else:
            text = " ".join([uninvert(parts[0]), *[f"({uninvert(p)})" for p in parts[1:]]])
    text = text.strip()
    if year and keep_year:
        text = f"{text} ({year})"
    return text or title.strip()


__all__ = ["ARTICLES", "display_title", "uninvert"]
