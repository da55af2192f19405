"""How the plugin decides what a test's ``image`` names, once per session per way of asking."""

from pathlib import Path

import pytest

from pytest_isolate.images import ImageRequest, SessionImages
from runtime.errors import ImageError


def test_a_request_is_decided_once_and_an_error_every_time(tmp_path: Path) -> None:
    images = SessionImages(report=lambda line: None)
    (tmp_path / "Dockerfile").write_text("FROM host\n")
    first = images.request("Dockerfile", tmp_path, {"A": "1"}, None)
    assert first == ImageRequest(
        "dockerfile", str(tmp_path / "Dockerfile"), str(tmp_path), (("A", "1"),), None
    )
    (tmp_path / "Dockerfile").unlink()  # decided: a session builds each image once
    assert images.request("Dockerfile", tmp_path, {"A": "1"}, None) is first
    # Another way of asking is another decision, and a missing Dockerfile fails each test.
    for _ in range(2):
        with pytest.raises(ImageError, match="no such Dockerfile"):
            images.request("Dockerfile", tmp_path, {"A": "2"}, None)
    assert images.request("busybox:latest", tmp_path, {}, None) == ImageRequest(
        "ref", "busybox:latest"
    )
