"""HTML that is escaped by construction: a value becomes markup only through :func:`esc`
(or a helper that calls it), so text from the server, which workflow authors and the
network control (workflow and task ids, errors, log lines, audit details), is shown as
text, never run as markup."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence


class Html(str):
    """A fragment of markup that is already safe: built only here, from escaped parts."""

    __slots__ = ()


def esc(value: object) -> Html:
    """``value`` as text in HTML (``None`` shows as an empty cell); markup stays as it is."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(esc(sep).join(esc(p) for p in parts))


def tag(name: str, content: object = "", **attrs: object) -> Html:
    """``<name attr="...">content</name>``; ``class_`` gives ``class``. Attribute values and
    content are escaped; ``name`` and attribute names are the caller's constants."""
    spelled = "".join(
        f' {key.rstrip("_").replace("_", "-")}="{esc(value)}"'
        for key, value in attrs.items()
        if value is not None
    )
    return Html(f"<{name}{spelled}>{esc(content)}</{name}>")


def link(href: str, text: object) -> Html:
    """A link to a page of this site; ``href`` is built from :func:`path` segments."""
    return tag("a", text, href=href)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, empty: str, id_: str = ""
) -> Html:
    """A table with a header row; every cell escaped unless it is :class:`Html` already."""
    body = [tag("tr", join(tag("td", cell) for cell in row)) for row in rows]
    if not body:
        return tag("p", empty, class_="empty")
    head = tag("tr", join(tag("th", h) for h in headers))
    return tag("table", join([tag("thead", head), tag("tbody", join(body))]), id=id_ or None)
