"""Where run folders live: one place turns a path or URL into a filesystem and a path in it.

A run folder (``output_dir/name``) may be a local or NFS path, ``file://...``, or any fsspec URL
(``s3://bucket/runs``, ``gs://...``), as Ray Train's ``storage_path``. Every reader and writer of the run
folder (config, state, checkpoints, the pseudo-label store, the embedding cache, eval tables) takes a
:class:`Location`, so local disks and object storage run the same code and the same tests.

S3-compatible endpoints and keys come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``); extra fsspec options from
the config's ``storage_options``.

Writes of whole files are atomic: locally a temporary file in the same folder renamed over the target
(readers never see half a file; a crash leaves the old version); on object storage one PUT, which
stores a whole object or nothing. New files get ordinary permissions (0644 under the usual umask) so a
colleague or a dashboard can read a shared run folder.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec

from pipeline.atomic import atomic_write_bytes
from pipeline.errors import StoreError

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Waits between tries of an object-storage operation that failed (a server restarting, a dropped
connection): 5 retries over about 15 s. Local disks are not retried: a full disk stays full."""


def describe_error(err: BaseException) -> str:
    """One line for a storage error: a full disk or quota, a read-only filesystem, else type and message."""
    no = getattr(err, "errno", None)
    if no in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (no space left on the device, or the quota is used up)"
    if no == errno.EROFS:
        return "the filesystem is read-only"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def with_retries(fn, what: str, loc: Location, verb: str = "write"):
    """``fn()``; on object storage a failure is retried after each of ``RETRY_DELAYS_S``; then, or at once
    on a local disk, one StoreError naming ``what`` and the cause, and saying that a rerun resumes.
    A StoreError or FileNotFoundError from ``fn`` is not retried."""
    delays = () if loc.is_local else RETRY_DELAYS_S
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except (StoreError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own kinds
            if attempt == len(delays):
                tries = f" after {attempt + 1} tries" if delays else ""
                raise StoreError(f"cannot {verb} {what}{tries}: {describe_error(e)}. The run stopped; what was "
                                 "finished is kept: fix the storage and rerun the same command to resume") from None
            log.warning("storage: could not %s %s (%s); retrying in %.1f s", verb, what, describe_error(e),
                        delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def is_url(text: str | os.PathLike) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: anything with a protocol (a Windows drive letter is not)."""
    s = str(text)
    return "://" in s and len(s.split("://", 1)[0]) > 1


class Location:
    """A file or folder on local disk or object storage: an fsspec filesystem and a path in it.

    ``loc / "name"`` is the child; ``str(loc)`` the URL (a plain absolute path when local); a local
    location also works wherever ``os.PathLike`` is accepted.
    """

    __slots__ = ("fs", "path", "protocol", "options")

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, protocol: str, options: dict | None = None):
        self.fs, self.path, self.protocol, self.options = fs, path.rstrip("/") or "/", protocol, dict(options or {})

    @classmethod
    def of(cls, where: str | os.PathLike | Location, storage_options: dict | None = None) -> Location:
        """A Location from a path, URL or Location. Relative local paths become absolute (cwd)."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if not is_url(text):
            return cls(fsspec.filesystem("file"), str(Path(text).expanduser().resolve()), "file")
        protocol = text.split("://", 1)[0]
        if protocol == "file":
            return cls.of(text[len("file://"):])
        opts = dict(storage_options or {})
        try:
            fs, path = fsspec.core.url_to_fs(text, **opts)
        except (ImportError, ValueError) as e:
            raise StoreError(f"cannot open {text}: {e} (is the fsspec package for {protocol}:// installed? "
                             "s3:// needs s3fs, gs:// needs gcsfs)") from None
        return cls(fs, path, protocol, opts)

    # -- naming -----------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def url(self) -> str:
        return self.path if self.is_local else f"{self.protocol}://{self.path}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path), self.protocol, self.options)

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, str(name)), self.protocol, self.options)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self.url} is not a local path")
        return self.path

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Location):
            return self.url == other.url
        if isinstance(other, (str, os.PathLike)):
            return self.url == Location.of(other).url
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self):  # pickles as its URL and options (filesystems are re-made on the other side)
        return (Location.of, (self.url, self.options))

    # -- queries ----------------------------------------------------------------------------------
    def _ask(self, fn, verb: str = "read"):
        """A query, retried on object storage (``with_retries``); direct on a local disk."""
        return fn() if self.is_local else with_retries(fn, self.url, self, verb)

    def exists(self) -> bool:
        return self._ask(lambda: self.fs.exists(self.path), "look up")

    def is_file(self) -> bool:
        return self._ask(lambda: self.fs.isfile(self.path), "look up")

    def is_dir(self) -> bool:
        return self._ask(lambda: self.fs.isdir(self.path), "look up")

    def list_names(self) -> list[str]:
        """Names of the entries of this folder (empty if it does not exist)."""
        try:
            entries = (self._ask(lambda: self.fs.ls(self.path, detail=False, refresh=True), "list")
                       if not self.is_local else os.listdir(self.path))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def find(self) -> list[str]:
        """Every file under this folder, as paths relative to it (one listing call on object storage)."""
        if not self.exists():
            return []
        if not self.is_local:
            self.fs.invalidate_cache(self.path)
        prefix = self.path.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self._ask(lambda: self.fs.find(self.path), "list") if p.startswith(prefix))

    # -- reading and writing ----------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        try:
            return self._ask(lambda: self.fs.cat_file(self.path))
        except FileNotFoundError:
            raise StoreError(f"{self.url} does not exist") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically (see the module docstring); transient object-storage errors are
        retried, and a failure is one StoreError naming the file (``with_retries``)."""
        if not self.is_local:
            with_retries(lambda: self.fs.pipe_file(self.path, data), self.url, self)
            return
        with_retries(lambda: atomic_write_bytes(Path(self.path), data), self.url, self)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        """Create the folder (a no-op on object storage, which has no folders)."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)

    def remove(self) -> None:
        """Delete this file if it exists."""
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def remove_tree(self) -> None:
        if self.exists():
            self.fs.rm(self.path, recursive=True)

    def local_copy(self, suffix: str = "") -> str:
        """A local file with this file's bytes (the file itself when local); the caller deletes a copy."""
        if self.is_local:
            return self.path
        fd, tmp = tempfile.mkstemp(suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(self.read_bytes())
        return tmp

    def zarr_store(self, read_only: bool = False):
        """A Zarr v3 store rooted here: LocalStore on disk, FsspecStore on object storage."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)

    def pandas_options(self) -> dict[str, Any]:
        """``storage_options`` for pandas/dask readers of this location (empty when local)."""
        return {} if self.is_local else dict(self.options)


def write_table(df, loc: Location) -> None:
    """A pandas frame as one Parquet file (eval/, audit/ tables), written atomically."""
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    loc.write_bytes(buf.getvalue())


def read_table(loc: Location):
    """A Parquet table of a run folder (eval/, audit/); a damaged file is an error naming it."""
    import io

    import pandas as pd

    try:
        return pd.read_parquet(io.BytesIO(loc.read_bytes()))
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many kinds of errors
        raise StoreError(f"{loc} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "it is damaged: delete it and rerun `semisam run` with the round redone, or restore it") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(loc: Location, block_bytes: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes, read in blocks (a 2.5 GB SAM checkpoint never sits in memory whole)."""
    digest = hashlib.sha256()
    try:
        with loc.fs.open(loc.path, "rb") as f:
            while block := f.read(block_bytes):
                digest.update(block)
    except FileNotFoundError:
        raise StoreError(f"{loc.url} does not exist") from None
    return digest.hexdigest()


def check_writable(loc: Location, what: str = "the run folder") -> None:
    """Write, read back and delete a small probe object: bad URLs and missing credentials fail here,
    before any work, with the cause and what to set. ``what`` names the location in the error. The probe's
    name is unique, so runs that probe one shared folder at once (a shared embedding cache) do not read or
    delete each other's probe."""
    probe = loc / f".semisam-write-probe-{uuid.uuid4().hex}"
    try:  # straight to the filesystem, without retries: a wrong URL or credential fails at once
        loc.mkdir()
        if probe.is_local:
            atomic_write_bytes(Path(probe.path), b"ok")
        else:
            probe.fs.pipe_file(probe.path, b"ok")
        ok = probe.fs.cat_file(probe.path) == b"ok"
        probe.remove()
    except Exception as e:  # noqa: BLE001 - every backend has its own errors; all mean "cannot use this"
        hint = ""
        if loc.protocol in ("s3", "s3a"):
            hint = (" (for S3 set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for an "
                    "S3-compatible server; check that the bucket exists)")
        raise StoreError(f"cannot write to {what} {loc.url}: {describe_error(e)}{hint}") from None
    if not ok:
        raise StoreError(f"{loc.url}: a probe file read back different bytes")
