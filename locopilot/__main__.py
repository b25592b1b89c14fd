"""Entry point of ``python -m locopilot``, the ``locopilot`` script and the frozen binary."""

from __future__ import annotations

import multiprocessing
import sys


def main() -> None:
    multiprocessing.freeze_support()
    # A runner is started as `locopilot _runner`, its chat-template helper as `locopilot _render`,
    # a training worker as `locopilot _train`; they skip the CLI (and its imports).
    if len(sys.argv) > 1 and sys.argv[1] == "_runner":
        from locopilot.engine import runner

        sys.exit(runner.probe(sys.argv[2:]) if "--probe" in sys.argv[2:] else runner.main())
    if len(sys.argv) > 1 and sys.argv[1] == "_render":
        from locopilot.engine import template_process

        sys.exit(template_process.main())
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        from locopilot.training import worker

        sys.exit(worker.main())
    # `serve` alone (a service's start) goes straight to the server, without the command
    # line's imports (click, rich: about 0.1 s of every start).
    if sys.argv[1:] == ["serve"]:
        from locopilot import server

        sys.exit(server.main())
    # `--version` alone answers without importing the CLI (about 1.5 s of imports on a
    # slow core), in the same words click's version option prints.
    if sys.argv[1:] == ["--version"]:
        from locopilot import __version__

        print(f"locopilot, version {__version__}")
        return
    from locopilot.cli import cli

    cli()


if __name__ == "__main__":
    main()
