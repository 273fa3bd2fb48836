"""`python -m batchproxy.replica ...`: the reference replica without the batchproxy CLI
(development and tests only, not for production traffic)."""

from __future__ import annotations

import argparse
import logging

from batchproxy.replica import add_replica_arguments, run_replica


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m batchproxy.replica",
        description="TFS-compatible reference replica for development, tests and benchmarks. "
                    "Not for production traffic.")
    add_replica_arguments(parser)
    parser.add_argument("--log_level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--no_uvloop", action="store_true",
                        help="use asyncio's default event loop instead of uvloop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_replica(args)


if __name__ == "__main__":
    main()
