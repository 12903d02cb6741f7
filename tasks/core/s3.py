"""The one S3 client of the project and the one translation of S3 failures into our errors.

Used by the artifact store (`tasks.release.store.S3Store`) and by user data sources
(`tasks.data.sources`, `s3://bucket/key`), so both behave the same:

    client = s3_client(endpoint_url="http://127.0.0.1:8333", connect_timeout_s=2, max_attempts=3)
    with s3_errors("reading s3://b/k", endpoint=client.meta.endpoint_url, bucket="b", key="k"):
        body = client.get_object(Bucket="b", Key="k")["Body"].read()

Retries are botocore's own (`Config(retries={"mode": ..., "max_attempts": ...})`, exponential backoff
with jitter on connection errors, timeouts, 5xx and throttling); `s3_errors` only classifies what is
left once botocore gave up: unreachable endpoint, timeouts, 5xx and throttling are a
`TransientStoreError` (a `TransientError`: the stage exits with TRANSIENT_EXIT_CODE and the flow
retries it); rejected or missing credentials, a missing bucket or object and access denied are a plain
`StoreError` naming the endpoint and bucket (retrying cannot help).

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles,
instance roles) unless given explicitly; the endpoint from the argument, else AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL, else AWS. Addressing is path-style with a custom endpoint (SeaweedFS, MinIO).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tasks.core.stage import StageError, TransientError

#: Total attempts per request (botocore counts the first one) when neither the caller nor the AWS
#: configuration (AWS_MAX_ATTEMPTS, a profile's max_attempts) says otherwise.
DEFAULT_MAX_ATTEMPTS = 5
RETRY_MODES = ("standard", "adaptive")

# Error codes left after botocore's retries that may pass by themselves (retried by the flow).
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "500",
    "502",
    "503",
    "504",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class StoreError(StageError):
    """The store cannot do what was asked; the message names the store, release, file or setting."""


class TransientStoreError(StoreError, TransientError):
    """The S3 endpoint could not be reached, timed out or asked to slow down: the same call may succeed
    later, so a stage failing with it exits with TRANSIENT_EXIT_CODE and the flow retries it (a partial
    upload stays invisible, and the retry resumes it)."""


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The endpoint a client will use: the argument, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else
    None (AWS)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
    max_attempts: int | None = None,
    retry_mode: str = "standard",
    addressing_style: str = "auto",
):
    """A boto3 S3 client; retries, backoff and timeouts are botocore's configuration.

    Args:
        endpoint_url: the S3 endpoint (None: `resolve_endpoint`).
        region: the signing region (None: from the AWS configuration, else us-east-1).
        access_key / secret_key: explicit credentials (None: the standard AWS chain; prefer that).
        connect_timeout_s / read_timeout_s: per attempt.
        max_attempts: total attempts per request (None: the AWS configuration, else DEFAULT_MAX_ATTEMPTS).
        retry_mode: botocore's "standard" or "adaptive" (client-side rate limiting on throttling).
        addressing_style: "auto" (path-style with a custom endpoint), "path" or "virtual".
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    if retry_mode not in RETRY_MODES:
        raise StoreError(f"S3 client: retry mode must be one of {RETRY_MODES}, got {retry_mode!r}")
    if max_attempts is not None and max_attempts < 1:
        raise StoreError(f"S3 client: max_attempts must be >= 1, got {max_attempts}")
    endpoint = resolve_endpoint(endpoint_url)
    # A fresh session, not boto3's module-level default: that one caches the credentials it saw
    # first, so a changed environment (rotated keys, another endpoint) would be silently ignored.
    core = botocore.session.Session()
    if max_attempts is None:
        max_attempts = int(core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS)
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        botocore_session=core,
    )
    style = ("path" if endpoint else None) if addressing_style == "auto" else addressing_style
    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"mode": retry_mode, "max_attempts": max_attempts},
        s3={"addressing_style": style} if style else None,
        region_name=None if session.region_name else "us-east-1",
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def _root_cause(error: BaseException) -> BaseException:
    """The botocore error inside a boto3 wrapper: S3UploadFailedError chains the real one; a download
    whose retries ran out (RetriesExceededError, boto3's and s3transfer's) carries it as
    `last_exception`, which may also be a socket timeout or reset (a builtin TimeoutError /
    ConnectionError, returned when the chain holds no botocore error). Else `error` itself."""
    from botocore.exceptions import BotoCoreError, ClientError

    cause: BaseException | None = error
    seen: list[BaseException] = []
    while cause is not None and not any(cause is s for s in seen):
        if isinstance(cause, (ClientError, BotoCoreError)):
            return cause
        seen.append(cause)
        cause = getattr(cause, "last_exception", None) or cause.__cause__ or cause.__context__
    return next((c for c in seen if isinstance(c, (TimeoutError, ConnectionError))), error)


def error_code(error: BaseException) -> str:
    """The S3 error code of a (wrapped) ClientError ("NoSuchKey", "404", ...); "" for other errors."""
    from botocore.exceptions import ClientError

    cause = _root_cause(error)
    return str(cause.response.get("Error", {}).get("Code", "")) if isinstance(cause, ClientError) else ""


def translate_error(
    error: BaseException, what: str, *, endpoint: str | None, bucket: str, key: str | None = None
) -> StoreError:
    """The StoreError / TransientStoreError for a boto3/botocore failure of `what` (see the module docstring).

    Args:
        error: the exception boto3 raised (after botocore's own retries).
        what: what was being done, e.g. "reading s3://b/k"; it starts the message.
        endpoint: the endpoint URL (None: AWS S3); bucket, key: what the call addressed.
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    where = endpoint or "AWS S3"
    cause = _root_cause(error)
    if isinstance(cause, ClientError):
        err = cause.response.get("Error", {})
        code, message = str(err.get("Code", "")), err.get("Message", "") or str(cause)
        status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _CREDENTIAL_CODES:
            return StoreError(
                f"{what}: the S3 credentials were rejected by {where} for bucket {bucket!r} ({code}: "
                f"{message}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS profile"
            )
        if code == "NoSuchBucket":
            return StoreError(
                f"{what}: the bucket {bucket!r} does not exist at {where} (NoSuchBucket); create it "
                "first or fix the bucket name"
            )
        if code in _MISSING_KEY_CODES and key is not None:
            return StoreError(f"{what}: s3://{bucket}/{key} does not exist at {where} ({code})")
        if code in ("AccessDenied", "403"):
            return StoreError(
                f"{what}: access denied to s3://{bucket} at {where} ({code}); the credentials lack permission"
            )
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStoreError(
                f"{what}: the S3 endpoint {where} is unavailable right now ({code or status}: {message})"
            )
        return StoreError(f"{what}: S3 error at {where} for bucket {bucket!r} ({code}: {message})")
    if isinstance(cause, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)):
        return TransientStoreError(
            f"{what}: cannot reach the S3 endpoint {where} ({cause}); is the server "
            "running and the endpoint URL right?"
        )
    if isinstance(cause, (ReadTimeoutError, TimeoutError)):
        return TransientStoreError(f"{what}: the S3 endpoint {where} did not answer in time ({cause})")
    if isinstance(cause, (HTTPClientError, IncompleteReadError, ConnectionError)):
        # a connection reset or a body cut short while reading (ResponseStreamingError, ...), also as
        # the last error of a download whose retries ran out: the same call may succeed later
        return TransientStoreError(
            f"{what}: the connection to the S3 endpoint {where} broke off ({type(cause).__name__}: {cause})"
        )
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        return StoreError(
            f"{what}: no usable AWS credentials for {where} (bucket {bucket!r}: {cause}); set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or an AWS profile"
        )
    return StoreError(f"{what}: S3 failure at {where} for bucket {bucket!r}: {cause}")


@contextlib.contextmanager
def s3_errors(what: str, *, endpoint: str | None, bucket: str, key: str | None = None) -> Iterator[None]:
    """Raises `translate_error(...)` for any boto3/botocore error in the block (StoreErrors pass through)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except StoreError:
        raise
    except (Boto3Error, BotoCoreError, ClientError) as e:
        raise translate_error(e, what, endpoint=endpoint, bucket=bucket, key=key) from None


__all__ = [
    "StoreError",
    "TransientStoreError",
    "s3_client",
    "s3_errors",
    "translate_error",
    "error_code",
    "resolve_endpoint",
    "DEFAULT_MAX_ATTEMPTS",
]
