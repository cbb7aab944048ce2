"""``python -m markov_rsa.server [OPTIONS]``: the same command as ``markov-rsa serve``."""

from __future__ import annotations

import sys

from markov_rsa.cli.main import serve_app
from markov_rsa.cli._exits import run_command


def main() -> None:
    """Run the proxy with the command line's flags."""
    sys.exit(run_command(serve_app, sys.argv[1:], "python -m markov_rsa.server"))


if __name__ == "__main__":
    main()
