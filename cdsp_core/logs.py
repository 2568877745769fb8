"""Logging of a cdsp process: one format, and boto3's debug lines kept out.

The `cdsp` command line and the bench's worker processes set it up the same way.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int, fmt: str = FORMAT) -> None:
    logging.basicConfig(level=level, format=fmt)
    for name in ("botocore", "boto3", "s3transfer"):  # -v is for our lines: boto3's debug log
        logging.getLogger(name).setLevel(logging.INFO)  # prints request headers, the access key id among them
