"""A status passed on from another service keeps its code and message, and comes back as the
shared error class of that code where there is one (so `except NotFound` catches it)."""

from __future__ import annotations

import grpc
import pytest

from services.common import errors


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_a_passed_on_status_keeps_its_code_and_message(code):
    error = errors.error_for_status(code, "from upstream")
    assert error.code == code
    assert str(error) == "from upstream"
    assert not error.worker_fault  # passing a status on never blames the worker that sent it


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.INTERNAL, errors.Internal),
    ],
)
def test_a_code_with_a_shared_class_comes_back_as_that_class(code, cls):
    assert type(errors.error_for_status(code, "x")) is cls


def test_a_passed_on_code_does_not_leak_into_the_class():
    errors.error_for_status(grpc.StatusCode.PERMISSION_DENIED, "x")
    assert errors.ServiceError("y").code == grpc.StatusCode.INTERNAL
