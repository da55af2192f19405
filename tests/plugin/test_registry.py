"""The plugin and registries: an image reference the store lacks is pulled before the first test
that needs it (``--isolate-pull``), and the build cache of the Dockerfiles tests name is shared
through a registry (``--isolate-cache-to`` on one machine, ``--isolate-cache-from`` on another,
here: two stores). Real ``docker-registry`` on 127.0.0.1 (tests/registry_fixtures.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from runtime.image.store import Store
from runtime.registry.transfer import push
from tests.plugin.test_images import project  # noqa: F401 - the fixture, reused
from tests.registry_fixtures import RegistryServer

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest

PULLED = """
    import os
    import pytest

    @pytest.mark.container(image="{ref}")
    def test_in_the_pulled_image():
        assert open("/etc/marker").read() == "built\\n"
        assert os.environ["GREETING"] == "hello-from-image"
"""


def use_store(pytester: pytest.Pytester, path: Path) -> None:
    pytester._monkeypatch.setenv("PYTEST_ISOLATE_STORE", str(path))


@pytest.mark.rootless
def test_a_missing_image_is_pulled_unless_the_policy_says_never(
    project: pytest.Pytester,  # noqa: F811
    runpytest: RunPytest,
    registry: RegistryServer,
    tmp_path: Path,
) -> None:
    built = runpytest("-p", "no:cacheprovider", "-k", "runs_in_the_image")
    built.assert_outcomes(passed=1)
    ref = registry.ref("team/img", "1")
    local = Store.open()  # the project fixture's store, through PYTEST_ISOLATE_STORE
    image_id = next(i.id for i in local.list_images() if not i.tags)
    push(local, image_id, ref)

    use_store(project, tmp_path / "empty-store")
    project.makepyfile(test_pulled=PULLED.format(ref=ref))
    never = runpytest("-p", "no:cacheprovider", "test_pulled.py", "--isolate-pull=never")
    never.assert_outcomes(errors=1)
    never.stdout.fnmatch_lines(["*is not in the store*pytest-isolate pull*"])

    pulled = runpytest("-p", "no:cacheprovider", "test_pulled.py", "-rA")
    pulled.assert_outcomes(passed=1)
    pulled.stdout.fnmatch_lines([f"pytest-isolate: pulling {ref}", "*3 of 3 layers downloaded*"])
    again = runpytest("-p", "no:cacheprovider", "test_pulled.py")
    again.assert_outcomes(passed=1)
    assert "pulling" not in again.stdout.str(), "policy missing pulled an image it had"


def test_the_build_cache_goes_through_a_registry(
    project: pytest.Pytester,  # noqa: F811
    runpytest: RunPytest,
    registry: RegistryServer,
    tmp_path: Path,
) -> None:
    cache = registry.ref("team/cache", "main")
    first = runpytest(
        "-p", "no:cacheprovider", "-k", "runs_in_the_image", f"--isolate-cache-to={cache}"
    )
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines([f"*exported the cache of 3 steps to {cache}@sha256:*"])

    use_store(project, tmp_path / "other-store")  # another CI agent
    second = runpytest(
        "-p", "no:cacheprovider", "-k", "runs_in_the_image", f"--isolate-cache-from={cache}"
    )
    second.assert_outcomes(passed=1)
    lines = [line for line in second.stdout.str().splitlines() if line.strip().startswith("[")]
    layer_steps = [line for line in lines if "COPY" in line or "RUN" in line]
    assert layer_steps and all(line.endswith("CACHED") for line in layer_steps), lines
