"""``s3://bucket/key`` URLs: the project's one S3 client, and its one-line errors.

Anywhere a path is accepted (a list file, the images it names, a shard set, an output folder
of make_lists.py or make_shards.py) an ``s3://`` URL works too. DALI reads image URLs
natively (``fn.io.file.read``, the AWS SDK inside its wheel); everything else goes through
boto3 (the ``s3`` extra: ``pip install 'dali-resnet-trainer[s3]'``).

Credentials, region and endpoint come from the standard AWS places, read by boto3 and by
DALI's SDK alike: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` with ``~/.aws/credentials`` and ``~/.aws/config``, an instance role;
``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, moto). This module never
prints or returns them: an error names the URL (and the endpoint, which is no secret), and
what a run saves holds only URLs.

Each process makes its own client on first use (a client must not cross a fork: the PIL
loader's workers each make theirs).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

SCHEME = "s3://"


class S3Error(OSError):
    """A bucket, object, credential or endpoint problem; the message is one line naming the
    URL."""


def is_url(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; S3Error for a URL with no bucket."""
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise S3Error(f"{url}: not an s3://bucket/key URL")
    return bucket, key


def join(url: str, *parts: str) -> str:
    """``url`` and ``parts`` joined by "/", normalized like a POSIX path ("a/./b/../c")."""
    bucket, key = split(url)
    joined = posixpath.normpath(posixpath.join("/", key, *parts)).lstrip("/")
    return f"{SCHEME}{bucket}/{joined}"


def dirname(url: str) -> str:
    bucket, key = split(url)
    return f"{SCHEME}{bucket}/{posixpath.dirname(key.rstrip('/'))}".rstrip("/")


def basename(url: str) -> str:
    return posixpath.basename(split(url)[1].rstrip("/"))


_clients: dict[int, object] = {}


def client():
    """This process's boto3 S3 client (made on first use)."""
    found = _clients.get(os.getpid())
    if found is not None:
        return found
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise S3Error(
            "s3:// URLs need boto3: pip install 'dali-resnet-trainer[s3]' (or pip install boto3)"
        ) from None
    # Retried with backoff: a throttled (503 SlowDown) or dropped request is routine at scale,
    # and a dead endpoint fails in seconds, not never. AWS_MAX_ATTEMPTS and AWS_RETRY_MODE,
    # the standard variables, say otherwise where they are set.
    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["max_attempts"] = 5
    config = Config(
        retries=retries,
        connect_timeout=10,
        read_timeout=60,
        # Enough for the threads that fetch a shard set or check a list's objects at once.
        max_pool_connections=32,
    )
    made = _clients[os.getpid()] = boto3.session.Session().client("s3", config=config)
    return made


def endpoint() -> str:
    """The endpoint the client talks to (no secret: shown in errors about reaching it)."""
    try:
        return str(client().meta.endpoint_url)
    except Exception:
        return os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")


_REASONS = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such object",
    "AccessDenied": "access denied (the credentials lack permission for it)",
    "InvalidAccessKeyId": (
        "the server does not know this access key (check AWS_ACCESS_KEY_ID, AWS_PROFILE "
        "or ~/.aws/credentials)"
    ),
    "SignatureDoesNotMatch": (
        "the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE or ~/.aws/credentials)"
    ),
    "ExpiredToken": "the session token has expired (renew the credentials)",
    "InvalidBucketName": "not a valid bucket name",
}


def error(url: str, exc: BaseException) -> S3Error:
    """``exc`` (botocore's, or an OSError) as one line naming ``url``."""
    if isinstance(exc, S3Error):
        return exc
    try:
        from botocore import exceptions as be
    except ImportError:  # pragma: no cover - boto3 is there whenever a request was made
        return S3Error(f"{url}: {exc}")
    if isinstance(exc, be.ClientError):
        info = exc.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _REASONS:
            reason = _REASONS[code]
        elif code in ("404", "NotFound") or status == 404:
            reason = "no such object" if _bucket_exists(url) else "no such bucket"
        elif code in ("403", "Forbidden") or status == 403:
            reason = _REASONS["AccessDenied"]
        else:
            reason = f"{code or status}: {info.get('Message') or 'request failed'}"
        return S3Error(f"{url}: {reason}")
    if isinstance(exc, be.NoCredentialsError | be.PartialCredentialsError):
        return S3Error(
            f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials)"
        )
    if isinstance(exc, be.EndpointConnectionError | be.ConnectTimeoutError | be.ReadTimeoutError):
        return S3Error(f"{url}: cannot reach the S3 endpoint {endpoint()} ({type(exc).__name__})")
    if isinstance(exc, be.BotoCoreError | OSError):
        return S3Error(f"{url}: {type(exc).__name__}: {exc}".replace("\n", " "))
    return S3Error(f"{url}: {exc!r}")


def _bucket_exists(url: str) -> bool:
    try:
        client().head_bucket(Bucket=split(url)[0])
    except Exception:
        return False
    return True


def _request(url: str, call):
    try:
        return call()
    except Exception as exc:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, BotoCoreError | ClientError | OSError):
            raise error(url, exc) from None
        raise


def read_bytes(url: str) -> bytes:
    bucket, key = split(url)
    return _request(url, lambda: client().get_object(Bucket=bucket, Key=key)["Body"].read())


def head(url: str) -> dict | None:
    """``{"size", "etag"}`` of the object at ``url``; None when there is no such object (a
    missing bucket, bad credentials or a dead endpoint raise S3Error)."""
    bucket, key = split(url)
    try:
        found = _request(url, lambda: client().head_object(Bucket=bucket, Key=key))
    except S3Error as exc:
        if str(exc).endswith(": no such object"):
            return None
        raise
    return {"size": int(found["ContentLength"]), "etag": found.get("ETag", "")}


def is_file(url: str) -> bool:
    return bool(key_of(url)) and head(url) is not None


def key_of(url: str) -> str:
    return split(url)[1]


def list_objects(prefix_url: str) -> Iterator[tuple[str, int, str]]:
    """``(url, size, etag)`` of every object whose key starts with ``prefix_url``'s, in key
    order, a thousand a request. A folder's objects: end the prefix with "/"."""
    bucket, prefix = split(prefix_url)
    pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    iterator = iter(pages)
    while True:
        page = _request(prefix_url, lambda: next(iterator, None))
        if page is None:
            return
        for item in page.get("Contents", ()):
            yield f"{SCHEME}{bucket}/{item['Key']}", int(item["Size"]), item.get("ETag", "")


def write_bytes(url: str, data: bytes) -> None:
    """Put ``data`` at ``url``: an object appears whole or not at all (S3's own guarantee)."""
    bucket, key = split(url)
    _request(url, lambda: client().put_object(Bucket=bucket, Key=key, Body=data))


def upload(path: str, url: str) -> None:
    """Upload the local file ``path`` to ``url`` (multipart for large files, in parallel)."""
    bucket, key = split(url)
    _request(url, lambda: client().upload_file(path, bucket, key))


def download(url: str, path: str) -> None:
    """Download ``url`` to the local ``path``, whole or not at all (``atomic_write``)."""
    from .fileio import atomic_write

    bucket, key = split(url)
    _request(url, lambda: atomic_write(path, lambda f: client().download_fileobj(bucket, key, f)))
