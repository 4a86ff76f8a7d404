"""Where a store lives: a local folder or an fsspec URL (``s3://bucket/prefix``, ``gs://``, ...).

One small class so the rest of ichprep says *what* it reads and writes, not
*how*: local folders keep direct file I/O, atomic write-then-rename and
``zarr.storage.LocalStore``; object stores go through fsspec (credentials and
endpoint from the environment, e.g. ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``; never from code) and ``zarr.storage.FsspecStore``, where a
PUT of a whole object is already atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

_BLOCK = 1 << 20
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"\..+\.\d+\.tmp")  # .NAME.PID.tmp


class Location:
    """A store root; names below it are '/'-separated relative paths."""

    def __init__(self, url: str | os.PathLike):
        self.fs, root = fsspec.core.url_to_fs(str(url))
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # Local paths travel as absolute paths: a Dask worker may run in another directory.
        self.url = self.root if self.is_local else str(url).rstrip("/")

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):  # ship to Dask workers as the URL; each process makes its own filesystem
        return (Location, (self.url,))

    def path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def child_url(self, name: str) -> str:
        return self.path(name) if self.is_local else f"{self.url}/{name}"

    # ---- queries
    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name))

    def isfile(self, name: str) -> bool:
        return self.fs.isfile(self.path(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def files(self, under: str = "") -> list[str]:
        """Relative names of every file below ``under`` (recursive, sorted)."""
        base = self.path(under)
        if not self.fs.exists(base):
            return []
        return sorted(p[len(self.root) + 1 :] for p in self.fs.find(base))

    def sizes_of(self, names, under: str = "") -> dict[str, int]:
        """Size of each of ``names`` that exists (absent ones are left out): a stat each on a local disk, one
        listing of ``under`` (where they all lie) on an object store."""
        if not self.is_local:
            wanted = set(names)
            return {k: v for k, v in self.sizes(under).items() if k in wanted}
        found = {}
        for name in names:
            try:
                found[name] = os.stat(self.path(name)).st_size
            except (FileNotFoundError, NotADirectoryError):
                continue
        return found

    def sizes(self, under: str = "") -> dict[str, int]:
        """Relative name -> size of every file below ``under``, from one listing (one request on an object store)."""
        base = self.path(under)
        if self.is_local:
            return _local_sizes(Path(base), under.strip("/"))
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        return {p[len(self.root) + 1 :]: int(info["size"]) for p, info in found.items()}

    def entries(self) -> list[str]:
        """Names directly below the root."""
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(self.path(name), "rb") as f:
            while chunk := f.read(_BLOCK):
                digest.update(chunk)
        return digest.hexdigest()

    # ---- reading
    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def open(self, name: str, mode: str = "rb"):
        return self.fs.open(self.path(name), mode)

    # ---- writing
    def makedirs(self, name: str = "") -> None:
        if self.is_local:
            Path(self.path(name)).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: a reader (or a crash) sees the old object or the new one, never half of one.

        A writer killed mid-write leaves its temporary file (see :meth:`leftover_temporaries`).
        """
        if self.is_local:
            target = Path(self.path(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}{_TMP_SUFFIX}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(self.path(name), bytes(data))  # one PUT (bytes: not every filesystem takes a memoryview)

    def leftover_temporaries(self, under: str = "") -> list[str]:
        """Temporary files of :meth:`write_bytes` below ``under``: only a killed writer leaves them."""
        return [name for name in self.files(under) if _TMP_NAME.fullmatch(name.rsplit("/", 1)[-1])]

    def write_json(self, name: str, data) -> None:
        self.write_bytes(name, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def write_parquet(self, name: str, frame) -> None:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        self.write_bytes(name, buffer.getvalue())

    def write_csv(self, name: str, frame) -> None:
        self.write_bytes(name, frame.to_csv(index=False).encode())

    def remove(self, name: str) -> None:
        path = self.path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ---- zarr
    def zarr_store(self, read_only: bool = False):
        import zarr

        if self.is_local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)


def _local_sizes(folder: Path, prefix: str) -> dict[str, int]:
    """Relative name -> size below a local folder, by ``os.scandir`` (fsspec's find builds a dict per file)."""
    sizes, stack = {}, [(str(folder), prefix)]
    while stack:
        path, name = stack.pop()
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            relative = f"{name}/{entry.name}" if name else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, relative))
            elif entry.is_file():
                sizes[relative] = entry.stat().st_size
    return sizes


def as_location(value: str | os.PathLike | Location) -> Location:
    return value if isinstance(value, Location) else Location(value)


def read_any(url_or_path: str | os.PathLike) -> bytes:
    """The bytes of one file given as a local path or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(url_or_path))
    return fs.cat_file(path)


def is_url(value: str | os.PathLike) -> bool:
    return "://" in str(value)
