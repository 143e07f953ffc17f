"""The container files name packages, never a package index, a mirror or a folder of the machine they were made on.

pip and debootstrap bring their own configured defaults; a machine-specific source (a mirror, a local wheel
folder) comes from a setting with no default.
"""

from __future__ import annotations

import re

import pytest

from tests.docker.dockerfile import ROOT

FILES = ("Dockerfile", "docker/smoke.sh", "docker/README.md", "README.md")
NAMED = (
    "pypi.org",
    "pythonhosted.org",
    "download.pytorch.org",
    "deb.debian.org",
    "debian.org/debian",
    "/opt/wheels",
    "/root/",
    "/work/",
    "/home/",
)
MACHINE_SETTINGS = ("SMOKE_MIRROR", "SMOKE_INDEX_URL", "SMOKE_TORCH_WHEEL", "SMOKE_WHEEL_DIR")


@pytest.mark.parametrize("name", FILES)
def test_no_index_mirror_or_machine_folder_is_named(name: str) -> None:
    text = (ROOT / name).read_text()
    allowed_home = "/home/windowlm"  # the image's own user's home, inside the container
    found = [word for word in NAMED if word in text.replace(allowed_home, "")]
    assert not found, f"{name} names {found}"


def test_smoke_settings_for_machine_sources_have_no_default() -> None:
    text = (ROOT / "docker" / "smoke.sh").read_text()
    defaults = dict(re.findall(r"\$\{(SMOKE_[A-Z_]+):-([^}]*)\}", text))
    for setting in MACHINE_SETTINGS:
        assert defaults.get(setting, "") == "", f"{setting} defaults to {defaults[setting]!r}"
    assert not [value for value in defaults.values() if "://" in value], defaults
    assert '"$rootfs" ${mirror:+"$mirror"}' in text, "debootstrap must get no mirror unless SMOKE_MIRROR names one"
