"""The fault-injecting S3 server moved to ``infra.testing.s3_faults`` (``mae chaos``
uses it); the tests' old import path keeps working."""

from infra.testing.s3_faults import Fault, FaultInjector, FaultyS3, SilentEndpoint

__all__ = ["Fault", "FaultInjector", "FaultyS3", "SilentEndpoint"]
