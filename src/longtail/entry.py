"""The ``longtail`` command's entry point: the command line, with a Ctrl-C during its start-up
imports (torch takes seconds to import) ending as quietly as one later on."""

from __future__ import annotations

import sys

try:
    from longtail.cli import main as _command_line
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def main() -> None:
    """Run the command line."""
    _command_line()
