"""`python -m batchproxy.bench ...`, the same as `batchproxy bench ...`."""

import sys

from batchproxy.cli import main

main(["bench", *sys.argv[1:]])
