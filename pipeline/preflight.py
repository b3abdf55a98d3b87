"""Pre-flight checks of a job's input and output URIs: seconds, before any planning or Ray.

The usual first-hour mistakes (an S3 URI with no ``AWS_ENDPOINT_URL`` for an S3-compatible
store, an unresolvable host, no credentials, a wrong region, a bucket that does not exist, access
denied, an output path under a file or in a folder that cannot be written) each become one
``PreflightError`` whose message says what is wrong and what to do, within a few seconds.

S3 probes go through boto3 with short connect / read timeouts and a single attempt (the job's
own requests keep their retries), one cheap request each (HeadBucket, then a one-key listing for
input, a zero-byte probe object that is deleted at once for output), and run under a wall-clock
deadline (DNS lookups have no timeout of their own). The endpoint, region and credentials come
from the same environment as ``pipeline/fs.py``: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` and the standard AWS credential chain.
Knows nothing of Parquet, prompts, models or Ray.
"""

from __future__ import annotations

import glob as _glob
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from .fs import _s3_endpoint, check_uri

T = TypeVar("T")

DEADLINE_S = 4.0  # every check ends within this, whatever the network does
CREDENTIALS_HINT = ("the standard AWS credential chain: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE / "
                    "~/.aws/credentials, or an instance / pod role")


class PreflightError(ValueError):
    """A job URI cannot be used as it is; the message says why and what to do."""


@dataclass(frozen=True)
class S3Target:
    """An ``s3://bucket/key`` URI split for boto3."""

    uri: str
    bucket: str
    key: str  # without leading or trailing "/"


def parse_s3(uri: str) -> S3Target:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return S3Target(uri, bucket, key.strip("/"))


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()`` in a daemon thread; PreflightError when it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="hymba-preflight", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise PreflightError(f"{what}: no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _client() -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(connect_timeout=2, read_timeout=3, retries={"max_attempts": 1, "mode": "standard"},
                 region_name=region())
    return boto3.session.Session().client("s3", endpoint_url=_s3_endpoint(), config=cfg)


def _where() -> str:
    ep = _s3_endpoint()
    return f"the S3 endpoint {ep} (AWS_ENDPOINT_URL)" if ep else f"AWS S3 in {region()} (no AWS_ENDPOINT_URL set)"


def explain_s3(e: BaseException, t: S3Target, field: str, need: str) -> PreflightError:
    """One or two lines for an S3 failure of ``field`` (``input.uri`` ...), ``need`` being the
    permission the job needs (``read`` / ``write``)."""
    from botocore import exceptions as bx

    head = f"{field} {t.uri}"
    if isinstance(e, PreflightError):  # the deadline
        ep = _s3_endpoint()
        if ep:
            return PreflightError(f"{head}: {ep} (AWS_ENDPOINT_URL) did not answer within {DEADLINE_S:.0f} s; "
                                  f"check that the S3 server is running and the URL is right")
        return PreflightError(f"{head}: AWS S3 did not answer within {DEADLINE_S:.0f} s (no network to AWS?). "
                              f"For an S3-compatible store (MinIO, Ceph, moto) set AWS_ENDPOINT_URL=http://HOST:PORT")
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return PreflightError(f"{head}: no AWS credentials found. Provide them through {CREDENTIALS_HINT}")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                      bx.ConnectionClosedError, bx.HTTPClientError)):
        ep = _s3_endpoint()
        if ep:
            return PreflightError(f"{head}: cannot reach the S3 endpoint {ep} (AWS_ENDPOINT_URL): "
                                  f"{_short(e)}. Check that the server is running and the URL is right")
        return PreflightError(f"{head}: cannot reach AWS S3 ({_short(e)}). For an S3-compatible store "
                              f"(MinIO, Ceph, moto) set AWS_ENDPOINT_URL=http://HOST:PORT; for AWS, check the "
                              f"network and AWS_REGION")
    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        if code in ("NoSuchBucket", "404") and need != "object":
            return PreflightError(f"{head}: bucket '{t.bucket}' does not exist at {_where()}; check the bucket name "
                                  f"(or AWS_ENDPOINT_URL / AWS_REGION if it lives elsewhere)")
        if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") \
                or (code == "400" and headers.get("x-amz-bucket-region")):
            actual = headers.get("x-amz-bucket-region") or err.get("Region") or "another region"
            return PreflightError(f"{head}: bucket '{t.bucket}' is in {actual}, not AWS_REGION={region()}: "
                                  f"set AWS_REGION={actual if actual != 'another region' else '<its region>'}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "TokenRefreshRequired"):
            return PreflightError(f"{head}: {_where()} rejected the credentials ({code}); check the keys that "
                                  f"{CREDENTIALS_HINT} provides")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "Forbidden"):
            perm = {"read": "s3:ListBucket and s3:GetObject", "write": "s3:PutObject and s3:DeleteObject"}.get(
                need, "s3:GetObject")
            return PreflightError(f"{head}: access denied ({'writing' if need == 'write' else 'reading'}) by "
                                  f"{_where()}. The credentials from {CREDENTIALS_HINT} need {perm} on "
                                  f"s3://{t.bucket}/")
        return PreflightError(f"{head}: S3 refused the request ({code or 'error'}: {err.get('Message') or e})")
    return PreflightError(f"{head}: {type(e).__name__}: {e}")


def _short(e: BaseException) -> str:
    return str(e).split("\n")[0][:200]


def _check_bucket(s3: Any, t: S3Target, field: str, need: str) -> None:
    """HeadBucket: the bucket exists, is reachable, the credentials work, the region matches."""
    from botocore.exceptions import ClientError

    try:
        resp = s3.head_bucket(Bucket=t.bucket)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) != "403":
            raise explain_s3(e, t, field, need) from None
        try:  # a HEAD answer has no body: a listing says whether the keys or the policy refused
            s3.list_objects_v2(Bucket=t.bucket, MaxKeys=1)
        except Exception as e2:
            raise explain_s3(e2, t, field, need) from None
        raise explain_s3(e, t, field, need) from None
    except Exception as e:  # classified into one message
        raise explain_s3(e, t, field, need) from None
    actual = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
    if actual and actual != region():
        raise PreflightError(f"{field} {t.uri}: bucket '{t.bucket}' is in {actual}, not AWS_REGION={region()}: "
                             f"set AWS_REGION={actual}")


def check_s3_read(uri: str, field: str = "input.uri", object_key: str | None = None) -> None:
    """The bucket of ``uri`` is reachable and its prefix can be listed (and ``object_key``, a
    name under the prefix, exists when given). PreflightError otherwise, within the deadline."""
    t = parse_s3(uri)

    def probe() -> None:
        s3 = _client()
        _check_bucket(s3, t, field, "read")
        prefix = t.key
        for i, ch in enumerate(prefix):
            if ch in "*?[":
                prefix = prefix[:i]
                break
        try:
            s3.list_objects_v2(Bucket=t.bucket, Prefix=prefix, MaxKeys=1)
            if object_key is not None:
                s3.head_object(Bucket=t.bucket, Key=f"{t.key}/{object_key}" if t.key else object_key)
        except Exception as e:
            from botocore.exceptions import ClientError

            if object_key is not None and isinstance(e, ClientError) and \
                    str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                raise PreflightError(f"{field} {uri}: no {object_key} under this prefix") from None
            raise explain_s3(e, t, field, "read") from None

    _run(probe, t, field, "read")


def check_s3_write(uri: str, field: str = "output.uri") -> None:
    """The bucket of ``uri`` exists and accepts writes under the prefix: a zero-byte probe
    object in ``_hymba/tmp/`` is written and deleted at once."""
    t = parse_s3(uri)

    def probe() -> None:
        s3 = _client()
        _check_bucket(s3, t, field, "write")
        key = "/".join(p for p in (t.key, "_hymba", "tmp", f".write-probe-{uuid.uuid4().hex}") if p)
        try:
            s3.put_object(Bucket=t.bucket, Key=key, Body=b"")
        except Exception as e:
            raise explain_s3(e, t, field, "write") from None
        try:
            s3.delete_object(Bucket=t.bucket, Key=key)
        except Exception as e:
            raise explain_s3(e, t, field, "write") from None

    _run(probe, t, field, "write")


def _run(probe: Callable[[], None], t: S3Target, field: str, need: str) -> None:
    try:
        with_deadline(probe, DEADLINE_S, f"{field} {t.uri}")
    except PreflightError as e:
        if "no answer within" in str(e):
            raise explain_s3(e, t, field, need) from None
        raise


def check_local_input(uri: str, field: str = "input.uri") -> None:
    """A local input path (not a glob) exists."""
    path = os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))
    if _glob.has_magic(path):
        return
    if not os.path.exists(path):
        raise PreflightError(f"{field} {uri}: no such file or folder")


def check_local_output(uri: str, field: str = "output.uri") -> None:
    """A local output folder can be created and written: it is not a file, no part of its path
    is a file, and the nearest existing folder takes a file (an unnamed temporary one, so
    nothing is left behind; root's writes are probed too, not guessed from mode bits)."""
    path = os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))
    if os.path.exists(path) and not os.path.isdir(path):
        raise PreflightError(f"{field} {uri}: is a file, not a folder; choose a folder for the output")
    anc = path
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise PreflightError(f"{field} {uri}: {anc} is a file, so no folder can be made under it")
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        where = "the folder" if anc == path else f"{anc} (where it would be created)"
        raise PreflightError(f"{field} {uri}: cannot write to {where}: {e.strerror or e}") from None


def check_input(uri: str, field: str = "input.uri") -> None:
    """Input pre-flight: local existence, or S3 reachability and read access."""
    check_uri(uri)
    if uri.startswith("s3://"):
        check_s3_read(uri, field)
    else:
        check_local_input(uri, field)


def check_output(uri: str, field: str = "output.uri") -> None:
    """Output pre-flight: a local folder that can be written, or an S3 bucket that accepts writes."""
    check_uri(uri)
    if uri.startswith("s3://"):
        check_s3_write(uri, field)
    else:
        check_local_output(uri, field)
