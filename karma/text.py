"""Item text: the ONE function that turns an item's fields into the text the LLM reads.

Every module that shows an item to a model (item tower, generation targets, baselines, serving)
goes through `render_item_text`, so the same movie never reads two different ways.

    >>> render_item_text("Toy Story", 1995, ["Animation", "Children's", "Comedy"])
    "Toy Story (1995) | Animation, Children's, Comedy"
    >>> split_title_year("Toy Story (1995)")
    ('Toy Story', 1995)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# A trailing "(1995)" as in MovieLens titles; only plausible film years count, so that
# "Seven (Se7en)" or "Apollo (13)" are not read as years.
_TITLE_YEAR = re.compile(r"^(?P<title>.*\S)\s*\((?P<year>1[89]\d\d|20\d\d)\)\s*$")

SEPARATOR = " | "


def split_title_year(title: str) -> tuple[str, int | None]:
    """Split a MovieLens title "Toy Story (1995)" into ("Toy Story", 1995).

    Titles without a trailing year come back unchanged (stripped) with year None.
    """
    title = title.strip()
    match = _TITLE_YEAR.match(title)
    if match is None:
        return title, None
    return match.group("title"), int(match.group("year"))


def title_has_year(title: str, year: int | None = None) -> bool:
    """True when `title` already ends with "(year)" (any year when `year` is None)."""
    _, found = split_title_year(title)
    return found is not None and (year is None or found == year)


def _render_attributes(attributes: str | Sequence[str] | Mapping[str, object]) -> str:
    if isinstance(attributes, str):
        return attributes.strip()
    if isinstance(attributes, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in attributes.items() if str(v).strip())
    return ", ".join(str(a).strip() for a in attributes if str(a).strip())


def render_item_text(
    title: str,
    year: int | None = None,
    categories: Sequence[str] = (),
    attributes: str | Sequence[str] | Mapping[str, object] | None = None,
) -> str:
    """Render an item as "Title (Year) | Category, Category | attributes".

    The year is appended unless the title already ends with "(year)"; empty parts are left out,
    so an item with only a title renders as its title.
    """
    head = title.strip()
    if year is not None and not title_has_year(head, year):
        head = f"{head} ({year})"
    parts = [head]
    cats = ", ".join(c.strip() for c in categories if c and c.strip())
    if cats:
        parts.append(cats)
    if attributes is not None:
        attrs = _render_attributes(attributes)
        if attrs:
            parts.append(attrs)
    return SEPARATOR.join(parts)
