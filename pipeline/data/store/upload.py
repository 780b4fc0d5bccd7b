"""Publishing a part into a token store in object storage, which has no rename.

`mm tokenize --out s3://bucket/prefix/tokens.zarr` (also gs://, az://) builds the
part in a local staging store with the local writer (pipeline/data/tokenize.py),
checks it, and uploads it file by file:

1. Lock: `<source>/.<part>.lock`, put only if absent (a conditional put), holding
   the writer's host and PID. A second writer is refused naming them. A lock left
   by a process of this host that is no longer alive is taken over (an upload
   killed halfway is rerun on its machine); a lock of another host is deleted by
   hand once its writer is known to be gone.
2. A complete part is refused without --force.
3. Build locally; check the part as the reader does, and every chunk file against
   the sha256 recorded in its attributes.
4. Root and source groups: put only if absent; a root made with another
   tokenizer is refused.
5. The part's files, all but its own zarr.json, then that zarr.json (the part's
   attributes with their checksum) last: it is the completion marker. Readers
   list a part only when its zarr.json exists (layout.list_parts), so an upload
   cut anywhere leaves a part that is absent, and rerunning uploads it again.
   With --force the old marker is deleted first, and objects of the old part
   that the new one lacks are deleted before the new marker goes up.
6. Release the lock (delete it).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from pipeline.data.store.cache import cache_directory
from pipeline.data.store.layout import part_name
from pipeline.data.store.remote import Bucket, RemotePath
from pipeline.errors import UserError


def tokenize_to_url(url: str, source: str, part: tuple[int, int], force: bool, build) -> dict:
    """Build part `part` of `source` with build(local_store) (which returns tokenize_files' result), then
    publish it under `url` as the module docstring says; returns that result with the remote path."""
    bucket = Bucket.at(url)
    name = part_name(*part)
    key = f"{source}/{name}"
    marker = f"{key}/zarr.json"
    with RemoteLock(bucket, f"{source}/.{name}.lock", f"{url}/{key}"):
        before = bucket.listing(refresh=True)
        if marker in before and not force:
            raise UserError(f"{url}/{key}: part exists (use --force to replace it)")
        staging_root = cache_directory().parent / "staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tokens-", dir=staging_root) as tmp:
            staging = Path(tmp) / "tokens.zarr"
            result = build(staging)
            files = checked_files(staging / source / name)
            create_group(bucket, "zarr.json", (staging / "zarr.json").read_bytes(), root=True)
            create_group(bucket, f"{source}/zarr.json", (staging / source / "zarr.json").read_bytes())
            if marker in before:  # --force: from here on the old part is absent to readers
                bucket.delete(marker)
            for rel, path in files.items():
                if rel != "zarr.json":
                    bucket.put(f"{key}/{rel}", path.read_bytes())
            for stale in sorted(k for k in before if k.startswith(f"{key}/") and k[len(key) + 1:] not in files):
                bucket.delete(stale)
            bucket.put(marker, files["zarr.json"].read_bytes())  # last: the part is complete from now on
    return {**result, "path": f"{url}/{key}", "store": url}


def checked_files(part: Path) -> dict[str, Path]:
    """{relative name: path} of every file of a locally built part, after the reader's checks and
    every chunk file's sha256 against its attributes (what is uploaded is what was recorded)."""
    from pipeline.data.store.reader import open_part

    attrs = open_part(part).attrs
    files = {p.relative_to(part).as_posix(): p for p in sorted(part.rglob("*")) if p.is_file()}
    for rel, sha in attrs["chunk_sha256"].items():
        with open(files[rel], "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha:
                raise UserError(f"{files[rel]}: sha256 differs from its part's attributes right after writing "
                                "(a local disk fault); nothing was uploaded")
    return files


def create_group(bucket: Bucket, key: str, document: bytes, root: bool = False) -> None:
    """Put a group's zarr.json unless one exists; the root must hold the same tokenizer."""
    if bucket.put(key, document, create=True) or not root:
        return
    have = (json.loads(bucket.get(key)).get("attributes") or {}).get("tokenizer") or {}
    want = json.loads(document)["attributes"]["tokenizer"]
    if have.get("fingerprint") != want["fingerprint"]:
        raise UserError(f"{bucket.url}: made with another tokenizer (sha256 {str(have.get('fingerprint'))[:12]}, "
                        f"vocab {have.get('vocab_size')}; this one {want['fingerprint'][:12]}, vocab "
                        f"{want['vocab_size']}): write into another --out")


def create_root(url: str, document: dict) -> None:
    """`mm tokenize --init` on a URL: the root group, if missing (refusing another tokenizer's), as the
    local writer formats it (writer.create_if_missing)."""
    data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
    create_group(Bucket.at(url), "zarr.json", data, root=True)


class RemoteLock:
    """One writer per part in object storage: a lock object put only if absent, deleted on release."""

    def __init__(self, bucket: Bucket, key: str, what: str):
        self.bucket, self.key, self.what = bucket, key, what
        self.url = RemotePath(bucket, key)

    def __enter__(self) -> RemoteLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}
        for _ in range(3):
            if self.bucket.put(self.key, json.dumps(me).encode(), create=True):
                return self
            try:
                holder = json.loads(self.bucket.get(self.key))
            except UserError:  # released meanwhile: try again
                continue
            except ValueError:
                holder = {}
            if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                self.bucket.delete(self.key)  # left by a writer of this host that died: take over
                continue
            raise UserError(f"{self.what}: being written by process {holder.get('pid', '?')} on "
                            f"{holder.get('host', '?')} since {holder.get('since', '?')} (lock {self.url}); wait "
                            "for it to finish, or delete the lock if that writer is gone")
        raise UserError(f"{self.what}: could not take the lock {self.url} (other writers keep taking it)")

    def __exit__(self, exc_type, *rest) -> None:
        try:
            self.bucket.delete(self.key)
        except UserError:
            if exc_type is None:  # else the error that stopped the upload is the one to report
                raise


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
