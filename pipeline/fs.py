"""Filesystems for job URIs: local paths and ``s3://`` (any S3-compatible store), through
``pyarrow.fs``. The S3 endpoint comes from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, tries per request from
``AWS_MAX_ATTEMPTS`` (default 10, standard retry strategy: jittered exponential backoff on
throttling, 5xx, resets and timeouts), credentials from the standard AWS chain (never read,
logged or stored here).

Also owns the small helpers every other module uses: joining paths, atomic writes (local temp
file + rename; on S3 a temporary key, then a server-side copy to the final key), JSON objects.
Knows nothing of Parquet schemas, prompts or Ray.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A parsed URI: the filesystem, the path inside it, and the URI prefix to rebuild URIs."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "s3" or "file"

    def uri(self, path: str | None = None) -> str:
        """The user-facing URI of ``path`` (default: this location)."""
        p = self.path if path is None else path
        return f"s3://{p}" if self.scheme == "s3" else p

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


DEFAULT_S3_MAX_ATTEMPTS = 10


def s3_max_attempts() -> int:
    """Tries per S3 request: ``AWS_MAX_ATTEMPTS`` (the AWS SDKs' own setting, which boto3 reads
    too), default 10. Throttling (503 SlowDown), 5xx, connection resets and timeouts are retried
    with jittered exponential backoff (the AWS SDK's standard retry strategy)."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS", "")
    try:
        n = int(raw) if raw.strip() else DEFAULT_S3_MAX_ATTEMPTS
    except ValueError:
        raise ValueError(f"AWS_MAX_ATTEMPTS={raw!r} is not an integer") from None
    return max(1, n)


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str, max_attempts: int) -> pafs.S3FileSystem:
    kw: dict[str, Any] = {"region": region,
                          "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)}
    if endpoint:
        kw["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kw["scheme"] = "http"
    return pafs.S3FileSystem(**kw)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for the current environment (endpoint override, region, retries)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3_filesystem(_s3_endpoint(), region, s3_max_attempts())


def check_uri(uri: str) -> str:
    """``uri`` if it is a local path, ``file://`` or ``s3://bucket[/prefix]`` URI, else ValueError
    (no I/O: the job spec checks its URIs with this)."""
    if not uri or not uri.strip():
        raise ValueError("empty URI")
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"{uri}: not an s3://bucket/prefix URI")
    elif "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: unsupported URI scheme (use s3:// or a local path)")
    return uri


def resolve(uri: str) -> Location:
    """Parse a local path, ``file://`` URI or ``s3://bucket/key`` URI into a Location."""
    check_uri(uri)
    if uri.startswith("s3://"):
        return Location(s3_filesystem(), uri[len("s3://"):].rstrip("/"), "s3")
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    path = os.path.abspath(os.path.expanduser(local))
    return Location(pafs.LocalFileSystem(), path, "file")


def exists(loc: Location, path: str) -> bool:
    return loc.fs.get_file_info(path).type != pafs.FileType.NotFound


def write_atomic(loc: Location, final_path: str, write: Callable[[Any], None], tmp_dir: str) -> None:
    """Write ``final_path`` so that readers see either nothing or the whole file.

    ``write`` receives an output stream. Local: a temporary file beside the target, then
    ``os.replace``. S3: a temporary key under ``tmp_dir``, then a copy to the final key (a
    single-object PUT/copy is atomic on S3) and the temporary key is deleted.
    """
    name = posixpath.basename(final_path)
    if loc.scheme == "file":
        parent = posixpath.dirname(final_path)
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with loc.fs.open_output_stream(tmp) as out:
                write(out)
            os.replace(tmp, final_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    tmp = posixpath.join(tmp_dir, f"{name}.{uuid.uuid4().hex}.tmp")
    try:
        with loc.fs.open_output_stream(tmp) as out:
            write(out)
        loc.fs.copy_file(tmp, final_path)
    finally:
        if exists(loc, tmp):
            loc.fs.delete_file(tmp)


def write_json(loc: Location, path: str, obj: Any, tmp_dir: str) -> None:
    """Atomically write ``obj`` as indented JSON."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    write_atomic(loc, path, lambda out: out.write(data), tmp_dir)


def read_json(loc: Location, path: str) -> Any | None:
    """The JSON object at ``path``, or None when there is none."""
    if not exists(loc, path):
        return None
    with loc.fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{loc.uri(path)}: not valid JSON ({e})") from e


def delete_prefix(loc: Location, path: str) -> None:
    """Delete a file or a whole directory / prefix if present."""
    info = loc.fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        loc.fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(path)
