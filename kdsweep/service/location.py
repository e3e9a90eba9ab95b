"""Where a sweep's state lives: the storage URL, parsed in one place.

Light on purpose (the standard library only, until a storage is opened), so the command line
checks a URL, hides its password and names a study's folders without importing Optuna,
SQLAlchemy or torch. `kdsweep.service.storage` opens what a `StorageLocation` names.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only
    import sqlalchemy


DEFAULT_URL = "sqlite:///kdsweep.db"
URL_HELP = "use sqlite:///FILE.db or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
# The schemes open_storage accepts (the backends kdsweep runs and tests: its study lock and
# schema creation are written for these two); anything else is a usage error.
SCHEME = re.compile(r"^(sqlite|postgresql|postgresql\+\w+)://")
ARTIFACTS_DIR = "kdsweep-artifacts"  # beside a SQLite file: checkpoints and weights per study
RUNS_DIR = "runs"  # beside a SQLite file: TensorBoard runs per study


class StorageError(RuntimeError):
    """The storage cannot be used; the message names it (password hidden) and what to do."""


class StorageURLError(StorageError):
    """The storage URL, or a study name (it names folders beside the storage), is malformed:
    a usage error, found before anything is opened."""


# ---------------------------------------------------------------- the storage location


def _split_userinfo(url: str) -> tuple[str, str | None, str | None, str]:
    """(head, user, password, rest) of a URL or a malformed one (no scheme, one slash).

    Like urllib.parse, the userinfo ends at the *last* `@` of the authority; unlike it, the
    authority is not cut at the first `/`, so `kd:p@ss/x@host/db` has the password `p@ss/x`
    and the host `host`: a password is never shown, nor looked up as a host name. An
    authority that starts with `/` (sqlite:////abs/path) has no userinfo.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, sep, rest = url.partition("//")
        if not sep:
            scheme, rest = "", url
    head = scheme + sep
    if rest.startswith("/"):
        return head, None, None, rest
    authority_end = len(rest.split("?", 1)[0])
    at = rest.rfind("@", 0, authority_end)
    if at < 0:
        return head, None, None, rest
    user, colon, password = rest[:at].partition(":")
    return head, user, (password if colon else None), rest[at + 1:]


def password_of(url: str | None) -> str | None:
    """The password in a storage URL (as written, percent-escapes kept), or None."""
    return _split_userinfo(url or "")[2] or None


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for every message, log and export."""
    head, user, password, rest = _split_userinfo(url)
    if user is None:
        return url
    return f"{head}{user}{':***' if password is not None else ''}@{rest}"


def redact_text(text: str, url: str | None) -> str:
    """Remove passwords wherever they appear in `text` (e.g. a driver's error message).

    Every URL's user:password@ is masked, and the password of `url` (the storage in use) is
    masked wherever it appears on its own, as written and percent-decoded.
    """
    text = re.sub(r"(://[^:/@\s]*:)\S*@", r"\1***@", text)
    password = password_of(url)
    if password:
        for form in {password, urllib.parse.unquote(password)}:
            if len(form) >= 3:  # shorter ones would mask innocent text
                text = text.replace(form, "***")
    return text


@dataclass(frozen=True)
class StorageLocation:
    """Where a sweep's state lives: made from a storage URL, the only parser of one.

    `StorageLocation.parse(url)` checks the URL (StorageURLError, a usage error, when it is
    not one); `shown` is it with the password hidden; `sqlite_path` is the SQLite file (None
    for a server or in-memory database); `artifacts(study)` and `runs()` are the folders
    beside a SQLite file (else in the working folder). `kdsweep.service.storage.open_storage`
    opens it.
    """

    url: str  # as given, password included: never print it, print `shown`

    @classmethod
    def parse(cls, url: str | None) -> StorageLocation:
        url = url or DEFAULT_URL
        if not SCHEME.match(url):
            raise StorageURLError(f"{redact(url)!r} is not a storage URL; {URL_HELP}.")
        return cls(url)

    @property
    def shown(self) -> str:
        return redact(self.url)

    @property
    def password(self) -> str | None:
        return password_of(self.url)

    def hide(self, text: str) -> str:
        """`text` with this storage's password (and any URL's) masked."""
        return redact_text(text, self.url)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file (`~` expanded, as given: relative to the working folder), or None."""
        if not self.url.startswith("sqlite:///"):
            return None
        path = self.url[len("sqlite:///"):].split("?", 1)[0]
        return None if path in ("", ":memory:") else Path(path).expanduser()

    def _beside(self, name: str) -> Path:
        path = self.sqlite_path
        return path.resolve().parent / name if path is not None else Path(name)

    def artifacts(self, study_name: str, explicit: str | Path | None = None) -> Path:
        """Checkpoints and kept weights of a study: `<explicit or beside the file>/<study>`.

        The study name must be a safe one (`check_study_name`), so the folder is always a
        direct child of the artifacts folder.
        """
        base = Path(explicit).expanduser() if explicit else self._beside(ARTIFACTS_DIR)
        return base / check_study_name(study_name)

    def runs(self, explicit: str | Path | None = None) -> Path:
        """Root of the TensorBoard runs: `explicit`, $KDSWEEP_RUNS, beside the SQLite file or ./runs."""
        if explicit:
            return Path(explicit).expanduser()
        if os.environ.get("KDSWEEP_RUNS"):
            return Path(os.environ["KDSWEEP_RUNS"]).expanduser()
        return self._beside(RUNS_DIR)

    def sqlalchemy_url(self) -> sqlalchemy.engine.URL:
        """The URL as SQLAlchemy must read it: userinfo split off as above, psycopg 3 driver."""
        import sqlalchemy

        head, user, password, rest = _split_userinfo(self.url)
        scheme = head[:-3]
        if scheme == "postgresql":
            scheme = "postgresql+psycopg"  # psycopg 3, not psycopg2
        try:
            parsed = sqlalchemy.engine.make_url(f"{scheme}://{rest}")
        except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
            raise StorageURLError(f"{self.shown!r} is not a storage URL ({exc}); {URL_HELP}.") from None
        if user is not None:
            parsed = parsed.set(username=urllib.parse.unquote(user),
                                password=None if password is None else urllib.parse.unquote(password))
        return parsed


def location(url: str | None) -> StorageLocation:
    """`StorageLocation.parse(url)`."""
    return StorageLocation.parse(url)


# Study names: they name folders (artifacts, runs) and database rows, so they are kept to
# characters every file system and shell takes as they are, and short enough for any path.
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
STUDY_NAME_MAX = 100


def check_study_name(name: str) -> str:
    """Return `name` if it is a safe study name, else raise StorageURLError (a usage error)."""
    # `kdsweep best --verify` runs NAME.verify beside NAME: that suffix does not count.
    if not STUDY_NAME.fullmatch(name or "") or len(name.removesuffix(".verify")) > STUDY_NAME_MAX:
        shown = name if len(name or "") <= 40 else name[:40] + "..."
        raise StorageURLError(
            f"study name {shown!r} is not allowed: use at most {STUDY_NAME_MAX} letters, digits, "
            "'.', '_' and '-', not starting with '.'."
        )
    return name
