"""Detached containers: ``run -d`` and the commands that find them later (``ps``, ``stop``,
``exec``, ``logs``, ``diff``, ``commit``, ``rm``), with no daemon.

* :mod:`~runtime.detached.record`: the record each container keeps on disk; ids, names, lookup;
* :mod:`~runtime.detached.logs`: the log file format (streams kept apart, partial lines);
* :mod:`~runtime.detached.protocol`: requests and replies on the supervisor's socket;
* :mod:`~runtime.detached.supervisor`: the process that holds one container for its whole life;
* :mod:`~runtime.detached.client`: what a command calls.
"""
