"""Logging of a cdsp process: one format, and boto3's debug lines kept out.

The `cdsp` command line and the bench's worker processes set it up the same way.
"""

from __future__ import annotations

import logging

from cdsp_core.credentials import redact

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Redacting(logging.Filter):
    """Every log line through `credentials.redact`: a `user:password@` a library logs never reaches the output."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def configure(level: int, fmt: str = FORMAT) -> None:
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, Redacting) for f in handler.filters):
            handler.addFilter(Redacting())
    for name in ("botocore", "boto3", "s3transfer"):  # -v is for our lines: boto3's debug log
        logging.getLogger(name).setLevel(logging.INFO)  # prints request headers, the access key id among them
