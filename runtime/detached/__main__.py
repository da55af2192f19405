"""``python -m runtime.detached``: the supervisor process (see :mod:`runtime.detached.supervisor`)."""

from runtime.detached.supervisor import main

main()
