"""How tasks.core.s3 classifies boto3/botocore failures: the errors boto3 and s3transfer raise, built as
they raise them (a download whose retries ran out carries its last error as `last_exception`)."""

from __future__ import annotations

import pytest
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

from tasks.core.s3 import StoreError, TransientStoreError, s3_errors, translate_error

WHERE = {"endpoint": "http://127.0.0.1:1", "bucket": "b", "key": "k"}


def _boto3_retries_exceeded(last: BaseException) -> RetriesExceededError:
    """boto3's download_file: s3transfer raises its RetriesExceededError(last) outside any handler, and
    boto3 re-raises it as its own inside the handler."""
    try:
        raise TransferRetriesExceededError(last)
    except TransferRetriesExceededError as e:
        try:
            raise RetriesExceededError(e.last_exception)
        except RetriesExceededError as wrapped:
            return wrapped


@pytest.mark.parametrize(
    "last",
    [
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
        ResponseStreamingError(error="Connection broken: IncompleteRead(5 bytes read, 10 more expected)"),
        IncompleteReadError(actual_bytes=5, expected_bytes=10),
        TimeoutError("timed out"),  # socket.timeout
        ConnectionResetError(104, "Connection reset by peer"),
    ],
    ids=type,
)
def test_a_download_whose_retries_ran_out_is_transient(last):
    error = translate_error(_boto3_retries_exceeded(last), "downloading s3://b/k", **WHERE)
    assert isinstance(error, TransientStoreError), error
    assert str(error).startswith("downloading s3://b/k: ") and "127.0.0.1:1" in str(error)


def test_a_broken_body_read_is_transient_and_s3_errors_raises_it():
    with pytest.raises(TransientStoreError, match="broke off .*ResponseStreamingError"):
        with s3_errors("reading s3://b/k", **WHERE):
            raise ResponseStreamingError(error="Connection broken")


def test_user_errors_stay_user_errors():
    missing = ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject")
    error = translate_error(missing, "reading s3://b/k", **WHERE)
    assert type(error) is StoreError and "s3://b/k does not exist" in str(error)
    # boto3's upload wrapper chains the real error: still found, still a user error
    try:
        try:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
        except ClientError as e:
            raise S3UploadFailedError("Failed to upload") from e
    except S3UploadFailedError as wrapped:
        error = translate_error(wrapped, "uploading", **WHERE)
    assert type(error) is StoreError and "access denied" in str(error)
    # retries that ran out on a local disk error are not the network's: not transient
    error = translate_error(_boto3_retries_exceeded(PermissionError(13, "denied")), "downloading", **WHERE)
    assert type(error) is StoreError
    dead = translate_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "listing", **WHERE)
    assert isinstance(dead, TransientStoreError) and "cannot reach the S3 endpoint" in str(dead)
