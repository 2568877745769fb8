"""How a cdsp process fails: the one exception type the CLI turns into a one-line reason and a
non-zero exit, and the exit status of a pre-empted one."""

import signal

EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports; training exits so on SIGTERM


class CdspError(Exception):
    """A user-facing error: the message names the file and the problem."""


def load_failure(e: BaseException) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in one line.

    torch explains a refusal over several paragraphs and suggests `weights_only=False`, which
    cdsp never uses (it would run whatever code the file holds); keep only the finding.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        found = [ln for ln in lines[1:] if not ln.startswith(("Please file an issue", "Check the documentation"))]
        return "refused by the safe loader, torch.load(weights_only=True)" + (f": {found[0]}" if found else "")
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
