"""Token stores in object storage (`s3://`, `gs://`, `az://`): URLs, the client, errors, and paths.

One library speaks all three protocols: obstore (the Rust `object_store` crate),
installed by the `cloud` extra (`pip install 'mm[cloud]'`). Credentials and
endpoints come from the standard environment only (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`,
...): nothing here takes a secret as an argument, so none can reach params,
a log, a checkpoint or metrics.json, and no message prints more than the
object's URL.

    location("s3://mmtokens/tokens.zarr") / "web" / "zarr.json"   # a RemotePath
    location("data/tokens.zarr")                                  # a pathlib.Path

RemotePath offers the few pathlib operations the store's reader and `mm verify`
use (`/`, name, exists, is_file, is_dir, iterdir, stat().st_size, read_text,
read_bytes), answered from one listing of the store taken when the store is
first opened, so opening a store costs one LIST and one GET per zarr.json.
A prefix is a directory when some object lies under it.

Errors: obstore retries transient failures (connection refused or reset,
timeouts, 5xx, 429) with exponential backoff (RETRY below); what still fails
is `RemoteUnavailable` (a UserError naming the URL), which training turns into
a clean stop with a checkpoint. A missing object or a permission error is a
UserError naming the URL at once.
"""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta
from pathlib import PurePosixPath

from pipeline.errors import UserError

URL = re.compile(r"(s3|gs|az)://[^/]+(/.*)?")
EXTRA = "pip install 'mm[cloud]'"
RETRY = {"max_retries": 6, "retry_timeout": timedelta(seconds=60),
         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=4), "base": 2.0}}
"""Up to 6 retries 0.1, 0.2, ... 3.2 s apart (about 6 s in all) before a fetch counts as failed."""


class RemoteUnavailable(UserError):
    """Object storage did not answer after the retries (network down, server stopped, 5xx)."""


def is_url(path) -> bool:
    """True for an object-storage URL (s3://, gs://, az://) or a RemotePath."""
    return isinstance(path, RemotePath) or (isinstance(path, str) and URL.fullmatch(path) is not None)


def location(path):
    """A RemotePath for an object-storage URL, else a pathlib.Path."""
    from pathlib import Path

    if isinstance(path, RemotePath):
        return path
    if isinstance(path, str) and is_url(path):
        bucket = Bucket.at(path)
        bucket.forget()  # opened anew: list again (another process may have written meanwhile)
        return RemotePath(bucket, "")
    return Path(path)


def _short(e: Exception) -> str:
    """The first line of a client error, without the request's query string (never any credential)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"\?\S*", "", line)[:240]


# --------------------------------------------------------------------------- the client


class Bucket:
    """The objects under one store URL: get, put (optionally only if absent), delete, and the listing."""

    _open: dict[str, Bucket] = {}
    _lock = threading.Lock()

    @classmethod
    def at(cls, url: str) -> Bucket:
        """The client for `url`, made once per process (the reader, the cache and the uploader share it)."""
        url = url.rstrip("/")
        with cls._lock:
            if url not in cls._open:
                cls._open[url] = cls(url)
            return cls._open[url]

    def __init__(self, url: str):
        try:
            import obstore
            from obstore.store import from_url
        except ImportError:
            raise UserError(f"{url}: reading or writing object storage needs the cloud extra ({EXTRA})") from None
        self.url, self.obs = url, obstore
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        client = {"allow_http": True} if url.startswith("s3://") and endpoint.startswith("http://") else {}
        try:
            self.store = from_url(url, client_options=client, retry_config=RETRY)
        except Exception as e:  # a malformed URL or configuration: the library's own words
            raise UserError(f"{url}: cannot open ({_short(e)})") from None
        self._listing: dict[str, int] | None = None

    def _fail(self, key: str, e: Exception):
        where = f"{self.url}/{key}" if key else self.url
        ex = self.obs.exceptions
        if isinstance(e, FileNotFoundError):
            return UserError(f"{where}: not found")
        if isinstance(e, ex.PermissionDeniedError | ex.UnauthenticatedError | PermissionError):
            return UserError(f"{where}: permission denied ({_short(e)}); check the credentials in the environment")
        return RemoteUnavailable(f"{where}: object storage unreachable after retries ({_short(e)})")

    def get(self, key: str) -> bytes:
        try:
            return bytes(self.obs.get(self.store, key).bytes())
        except Exception as e:
            raise self._fail(key, e) from None

    def put(self, key: str, data: bytes, create: bool = False) -> bool:
        """Write one object; with `create`, only if absent (a conditional put): False when it existed."""
        try:
            self.obs.put(self.store, key, data, mode="create" if create else "overwrite")
        except self.obs.exceptions.AlreadyExistsError:
            return False
        except Exception as e:
            raise self._fail(key, e) from None
        self._listing = None
        return True

    def delete(self, key: str) -> None:
        try:
            self.obs.delete(self.store, key)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._fail(key, e) from None
        self._listing = None

    def forget(self) -> None:
        self._listing = None

    def listing(self, refresh: bool = False) -> dict[str, int]:
        """{key: size} of every object under the store URL (one paginated LIST, kept until a write)."""
        if self._listing is None or refresh:
            try:
                found = {}
                for batch in self.obs.list(self.store, chunk_size=1000):
                    found.update((o["path"], int(o["size"])) for o in batch)
            except Exception as e:
                raise self._fail("", e) from None
            self._listing = found
        return self._listing


# --------------------------------------------------------------------------- paths


class RemotePath:
    """A key under a store URL, with the pathlib operations the reader and `mm verify` use."""

    def __init__(self, bucket: Bucket, key: str):
        self.bucket, self.key = bucket, key.strip("/")

    def __str__(self) -> str:
        return f"{self.bucket.url}/{self.key}" if self.key else self.bucket.url

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name) -> RemotePath:
        return RemotePath(self.bucket, f"{self.key}/{name}" if self.key else str(name))

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2] if self.key else self.bucket.url.rpartition("/")[2]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.bucket, self.key.rpartition("/")[0])

    def is_relative_to(self, other) -> bool:
        return isinstance(other, RemotePath | str) and str(self).startswith(str(other).rstrip("/") + "/")

    def relative_to(self, other) -> PurePosixPath:
        return PurePosixPath(str(self)[len(str(other).rstrip("/")) + 1:])

    def is_file(self) -> bool:
        return self.key in self.bucket.listing()

    def is_dir(self) -> bool:
        prefix = f"{self.key}/" if self.key else ""
        return any(k.startswith(prefix) for k in self.bucket.listing())

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self):
        prefix = f"{self.key}/" if self.key else ""
        names = {k[len(prefix):].partition("/")[0] for k in self.bucket.listing() if k.startswith(prefix)}
        return iter([self / n for n in sorted(names)])

    def glob(self, pattern: str):
        import fnmatch

        return iter([p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)])

    def stat(self) -> os.stat_result:
        size = self.bucket.listing().get(self.key)
        if size is None:
            raise FileNotFoundError(str(self))
        return os.stat_result((0o100444, 0, 0, 1, 0, 0, size, 0, 0, 0))

    @property
    def size(self) -> int:
        return self.stat().st_size

    def read_bytes(self) -> bytes:
        return self.bucket.get(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)
