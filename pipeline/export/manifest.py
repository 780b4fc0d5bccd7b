"""SHA256SUMS: the hash of every file of a directory, recorded when it is written.

The format is the one `sha256sum` writes (`<hex>  <name>` per line), so
`sha256sum -c SHA256SUMS` checks an export without mm; `mm verify` reads the
same file. Only plain files directly in the directory are listed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "SHA256SUMS"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path) -> Path:
    """Hash every file in `directory` (the manifest itself excepted) into directory/SHA256SUMS."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    path = directory / MANIFEST
    path.write_text("".join(f"{file_sha256(directory / name)}  {name}\n" for name in names), encoding="utf-8")
    return path


def read_manifest(path: Path) -> dict[str, str]:
    """{file name: sha256} from a SHA256SUMS file; ValueError names the first malformed line."""
    entries = {}
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name:
            raise ValueError(f"{path}:{no}: not a `<sha256>  <file name>` line")
        entries[name] = digest.lower()
    return entries
