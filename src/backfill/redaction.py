"""Keeping a database password out of everything backfill prints, logs or stores: URLs shown with
the password hidden, a command's arguments as history stores them, a driver's error text."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

HIDDEN = "***"


def redact_url(url: str | sa.URL) -> str:
    """The URL with its password hidden, safe to print."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):  # (a port that is not a number: ValueError)
        return "<unparseable database URL>"


def password_of(url: str | sa.URL | None) -> str | None:
    if url is None:
        return None
    try:
        password = sa.make_url(url).password
    except (sa.exc.ArgumentError, ValueError):
        return _typed_password(str(url))
    return None if not password else str(password)


def scrub(text: str, url: str | sa.URL | None) -> str:
    """`text` with the password of `url` (if it has one) replaced, wherever it appears."""
    password = password_of(url)
    return text.replace(password, HIDDEN) if password else text


def redact_arguments(arguments: Sequence[str], url: str | sa.URL | None = None) -> list[str]:
    """A command line as it may be stored or shown: any argument that is a URL with a password
    (`--database-url URL` or `--database-url=URL`) has it hidden, and the password of `url`
    appears nowhere."""
    shown = []
    for argument in arguments:
        option, equals, value = argument.partition("=")
        if equals and option.startswith("--") and password_of(value):
            argument = f"{option}={redact_url(value)}"
        elif password_of(argument):
            argument = redact_url(argument)
        shown.append(scrub(argument, url))
    return shown


def _typed_password(url: str) -> str | None:
    """The password of a URL SQLAlchemy cannot parse, as typed (`scheme://user:PW@host...`)."""
    _, found, rest = url.partition("://")
    credentials, at, _ = rest.rpartition("@")
    _, colon, password = credentials.partition(":")
    return password if found and at and colon and password else None
