"""What the plugin keeps on pytest's config and items; the engine is made on first use.

The plugin is loaded into every pytest session of an environment that has it installed, and
most of those isolate nothing. So importing it must not import the engine, the image store or
the builder (~80 ms of every pytest start otherwise): :func:`engine` imports and makes the
engine only when a test needs a container.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pytest_isolate.images import SessionImages
from pytest_isolate.options import TestContainer

if TYPE_CHECKING:
    from pytest_isolate.session import Launch
    from runtime import Engine

PLAN_KEY = pytest.StashKey[TestContainer]()
"""An isolated item's container options (only items that run in a container have one)."""
IMAGES_KEY = pytest.StashKey[SessionImages]()
EARLY_KEY: pytest.StashKey[Launch] = pytest.StashKey()
"""The next test's container, started while a test runs (:mod:`pytest_isolate.session`)."""
_ENGINE_KEY = pytest.StashKey["Engine"]()


def engine(config: pytest.Config) -> Engine:
    """The session's engine, made on first use."""
    found = config.stash.get(_ENGINE_KEY, None)
    if found is None:
        from runtime import Engine

        found = config.stash[_ENGINE_KEY] = Engine()
    return found


def close(config: pytest.Config) -> None:
    """Close the engine, if the session made one, and remove what it still runs."""
    found = config.stash.get(_ENGINE_KEY, None)
    if found is not None:
        from pytest_isolate.session import drop_early

        drop_early(config)
        found.close()
