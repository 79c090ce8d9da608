"""``python -m sqla_graphile.cli``: the command line, as ``python -m sqla_graphile``."""

from . import main

main(prog_name="graphile-worker")
