"""The sticky cookies' ``Set-Cookie`` fields (``cluster-endpoint::<service>``,
``cluster-version::<service>``), the same from the front door and the WSGI adapter."""

from __future__ import annotations

#: the SameSite values --cookie-samesite takes
SAMESITE = ("lax", "strict", "none")


def cookie_attributes(samesite: str = "lax") -> str:
    """The attributes after ``name=value``. SameSite=None comes with Secure: browsers
    drop a SameSite=None cookie without it (so it then needs https)."""
    attributes = f"Path=/; HttpOnly; SameSite={samesite.capitalize()}"
    return attributes + "; Secure" if samesite == "none" else attributes


def set_cookie(cookie: tuple[str, str], attributes: str) -> tuple[str, str]:
    """The (name, value) header pair setting ``cookie`` = (name, value)."""
    return ("Set-Cookie", f"{cookie[0]}={cookie[1]}; {attributes}")
