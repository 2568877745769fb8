"""The one exception type the CLI turns into a one-line reason and a non-zero exit."""


class CdspError(Exception):
    """A user-facing error: the message names the file and the problem."""
