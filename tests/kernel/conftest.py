"""Fixtures shared by the kernel tests."""

import pytest

from tests.otlp_receiver import GrpcReceiver


@pytest.fixture(scope="module")
def receiver():
    """An OTLP gRPC receiver for the module's agent to export spans to."""
    r = GrpcReceiver()
    yield r
    r.stop()
