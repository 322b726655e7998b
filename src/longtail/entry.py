"""The ``longtail`` command's entry point: the command line, with a Ctrl-C during its start-up
imports (torch takes seconds to import) ending as quietly as one later on."""

from __future__ import annotations

import os
import signal


def _interrupted_while_importing(signum: int, frame: object) -> None:
    # A KeyboardInterrupt raised inside the imports can be swallowed by a library's own import
    # fallbacks and resurface as an unrelated error from a half-imported module (numpy seen
    # doing so), so a Ctrl-C here ends the process at once: nothing has been written yet.
    os.write(2, b"interrupted\n")
    os._exit(130)


_before = signal.signal(signal.SIGINT, _interrupted_while_importing)
try:
    from longtail.cli import main as _command_line
finally:
    signal.signal(signal.SIGINT, _before)


def main() -> None:
    """Run the command line."""
    _command_line()
