"""Where gmeta reads and writes: local paths, or object-store URLs (``s3://bucket/key``,
``gs://``, ``abfs://``, ... any protocol fsspec has an implementation installed for).

Paths become :func:`location` objects: a ``pathlib.Path`` for a local path (so local
behaviour is exactly pathlib's) and a ``UPath`` (universal_pathlib: the pathlib interface
over fsspec) for a URL, so the rest of gmeta joins, lists, reads and writes both alike.
Checkpoints go through DCP's fsspec storage (gmeta.checkpoint); Parquet and tar shards are
read by pyarrow and webdataset from the file objects fsspec opens.

S3 credentials, region and endpoint come from the usual environment (read by botocore,
under s3fs): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, and ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, Ceph, a test server).

An object store has no rename: an object appears whole when its upload ends or not at all.
So where a local file is written under a temporary name and renamed into place,
:func:`write_atomic` writes a remote one to a local temporary file and uploads it in one
piece; readers see the old object or the new one, never part of one.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

__all__ = ["StorageError", "is_url", "location", "source", "temp_name", "write_atomic", "upload", "append_text",
           "rmtree", "absolute", "local_copy", "local_dir", "check_bucket", "describe"]


class StorageError(OSError):
    """A remote location cannot be used (no such bucket, access denied, unreachable
    endpoint). The message names the URL and what to check."""


def is_url(path) -> bool:
    """True for ``protocol://...`` other than ``file://``."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def location(path) -> Path:
    """``path`` as a Path-like object: ``pathlib.Path`` when local, ``UPath`` for a URL
    (typed as Path: it has the same interface)."""
    if isinstance(path, Path) and not is_url(path):
        return path
    s = str(path)
    if not is_url(s):
        return Path(s[len("file://"):] if s.startswith("file://") else s)
    from upath import UPath

    try:
        # no listings cache: other processes write the objects this one reads (a resumed
        # run's checkpoints, a worker's parts), and s3fs checks each read against the ETag
        # its cached listing holds, failing on an object replaced since
        return UPath(s, use_listings_cache=False)  # type: ignore[return-value]  # a Path in all but its class
    except (ValueError, ImportError) as e:  # an unknown protocol or its package missing
        raise StorageError(f"{s}: cannot open this URL: {e}") from None


@contextmanager
def source(path):
    """What pyarrow should read ``path`` from: the local path itself (pyarrow reads local
    files natively, memory-mapped), or an open fsspec file of a remote object."""
    path = location(path)
    if not is_url(path):
        yield str(path)
        return
    with path.open("rb") as f:
        yield f


def describe(path) -> str:
    """Where a URL's requests go, for error messages (the endpoint when one is set)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {endpoint})" if str(path).startswith("s3://") and endpoint else ""


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path``, ending in ``.tmp``, that no other writer uses: it
    holds the host name, the process id and a random token, because on a filesystem that
    several nodes share (NFS, Lustre) process ids alone repeat from node to node."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return path.with_name(f"{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path, write: Callable[[Path], object]) -> None:
    """Call ``write(p)`` with a local path ``p`` and put the file at ``path`` whole: locally by
    renaming ``p`` over it (``p`` is a :func:`temp_name`, so two processes, on one node or
    on two, never write into the same temporary file), remotely by one upload of ``p``."""
    path = location(path)
    if not is_url(path):
        tmp = temp_name(path)
        write(tmp)
        tmp.replace(path)
        return
    with tempfile.TemporaryDirectory(prefix="gmeta-upload-") as d:
        tmp = Path(d) / path.name
        write(tmp)
        try:
            path.fs.put_file(str(tmp), path.path)  # type: ignore[attr-defined]  # UPath
        except (PermissionError, FileNotFoundError) as e:
            raise _explain(path, e) from None


def upload(local: Path, dest) -> None:
    """Copy a local file to ``dest`` (a local path or an object), whole."""
    write_atomic(dest, lambda p: shutil.copyfile(local, p))


def append_text(path, text: str) -> None:
    """Append to a text file; an object (which cannot be appended to) is rewritten whole."""
    path = location(path)
    if not is_url(path):
        with open(path, "a") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    write_atomic(path, lambda p: p.write_text(old + text))


def absolute(path) -> str:
    """The path as others should be told it (MLflow tags, reports): absolute, or the URL."""
    path = location(path)
    return str(path) if is_url(path) else str(path.resolve())


@contextmanager
def local_copy(path):
    """A local path holding what ``path`` (a file or directory) holds: the path itself, or
    a temporary download of a remote one (for what reads local files only: MLflow's
    ``log_artifact``, a model's artifacts)."""
    path = location(path)
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gmeta-download-") as d:
        local = Path(d) / path.name
        try:
            path.fs.get(path.path, str(local), recursive=path.is_dir())  # type: ignore[attr-defined]
        except (PermissionError, FileNotFoundError) as e:
            raise _explain(path, e) from None
        yield local


@contextmanager
def local_dir(dest):
    """A local directory to write files into that end up in ``dest``: ``dest`` itself
    (created), or a temporary directory whose files are uploaded to a remote ``dest`` on
    leaving the block (not if it raised)."""
    dest = location(dest)
    if not is_url(dest):
        dest.mkdir(parents=True, exist_ok=True)
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="gmeta-upload-") as d:
        yield Path(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                upload(f, dest / f.relative_to(d).as_posix())


def rmtree(path) -> None:
    """Delete a directory (a prefix of objects) and everything under it; no error if absent."""
    path = location(path)
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.fs.rm(path.path, recursive=True)  # type: ignore[attr-defined]
    except FileNotFoundError:
        pass


def check_bucket(path, what: str) -> None:
    """Raise StorageError naming ``what`` (the option or key that gave the URL) when a URL's
    bucket does not exist or cannot be reached with the credentials at hand; local paths
    pass. Called before a job writes anything, so a typo fails at once."""
    path = location(path)
    if not is_url(path):
        return
    bucket = path.path.split("/", 1)[0]  # type: ignore[attr-defined]
    try:  # a listing tells the three apart (exists() says False when access is denied)
        path.fs.ls(bucket, detail=False, refresh=True)  # type: ignore[attr-defined]
    except FileNotFoundError:
        raise StorageError(f"{what}: {path}: bucket {bucket!r} does not exist{describe(path)}; create it or "
                           "correct the URL") from None
    except PermissionError as e:
        raise StorageError(f"{what}: {path}: access to bucket {bucket!r} denied{describe(path)}; check the "
                           f"credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket's policy: {e}") from None
    except OSError as e:
        raise StorageError(f"{what}: {path}: cannot reach bucket {bucket!r}{describe(path)}: "
                           f"{type(e).__name__}: {e}") from None


def _explain(path, e: Exception) -> StorageError:
    kind = "access denied" if isinstance(e, PermissionError) else "not found (no such bucket?)"
    return StorageError(f"{path}: {kind}{describe(path)}: {e}")
