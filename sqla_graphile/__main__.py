"""``python -m sqla_graphile``: the ``graphile-worker`` command line."""

from .cli import main

main(prog_name="graphile-worker")
