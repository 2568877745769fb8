"""Credentials never reach a log line, an error message, an MLflow param or tag: the one place that
recognises them.

- `redact(text)`: `scheme://user:password@host/...` -> `scheme://host/...`, in any text (and,
  with `secrets_in(argv)`, those credentials wherever else the text repeats them);
- `looks_secret(key, value)`: a setting named like a credential (secret, password, token, ...)
  or whose value holds an AWS access key id;
- `split_userinfo(url)`: the URL without its `user:password@`, and the two apart, for the
  clients that take credentials separately (MLflow's environment variables, the Pushgateway's
  basic auth).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

_SECRET_KEY = re.compile(r"secret|passw|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|session[_-]?key",
                         re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact(text: str, known: Iterable[str] = ()) -> str:
    """`scheme://user:password@host/...` -> `scheme://host/...` (safe for logs, tags and errors); and
    each of the `known` secrets (`secrets_in`) -> `***` wherever else the text repeats it."""
    text = _USERINFO.sub(r"\1", str(text))
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def secrets_in(texts: Iterable[str]) -> set[str]:
    """The credentials written into URLs among `texts` (a command line): each `user:password`, and
    the user and the password alone (URL-unquoted too) where 4 characters or more, so that `redact`
    masks them also where a library echoes them in another form (an S3 client quotes the bucket
    name `KEY:SECRET@bucket` that such a URI gives it)."""
    found: set[str] = set()
    for text in texts:
        for match in _USERINFO.finditer(str(text)):
            userinfo = match.group(0)[len(match.group(1)):-1]
            parts = [userinfo, *userinfo.split(":", 1)]
            found |= {p for part in parts for p in (part, urllib.parse.unquote(part)) if len(p) >= 4}
    return found


def looks_secret(key: str, value: str) -> bool:
    """True for a credential-like name (aws_secret_access_key, mlflow_token, ...) or an AWS key id in the value."""
    return bool(_SECRET_KEY.search(str(key)) or _AWS_KEY_ID.search(str(value)))


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """`http://user:pw@host:9091/x` -> ("http://host:9091/x", "user", "pw"); (url, None, None) without
    credentials. The user and password are URL-unquoted; the URL alone is safe to log."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None, None
    return redact(url), urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
