"""An agent's tenants name images, never host paths: Isolator(image_paths=False)."""
import pytest

from vmiso import InvalidSpec
from vmiso.image.resolve import resolve
from vmiso.paths import Workdir


def test_paths_refused_when_not_allowed(tmp_path):
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"not even an image")
    with pytest.raises(InvalidSpec, match="image paths are not allowed"):
        resolve(Workdir(tmp_path / "w"), str(base), allow_paths=False)
    with pytest.raises(InvalidSpec, match="image paths are not allowed"):
        resolve(Workdir(tmp_path / "w"), "/etc/shadow", allow_paths=False)
