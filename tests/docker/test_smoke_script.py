"""docker/smoke.sh builds and runs the image for real with podman; too heavy to run here, so it is linted, and
its promises are read from it."""

from __future__ import annotations

import re
import subprocess

from tests.docker import dockerfile
from tests.docker.dockerfile import ROOT
from tests.docker.test_dockerfile import tool

SMOKE = ROOT / "docker" / "smoke.sh"


def test_smoke_script_passes_shellcheck() -> None:
    result = subprocess.run(
        [tool("shellcheck"), "--severity=style", "--format=gcc", str(SMOKE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_smoke_script_can_stand_in_for_the_dockerfiles_base() -> None:
    """The script makes FROM's image with debootstrap of the same Debian release and checks its Python."""
    (base,) = [i.args.split()[0] for i in dockerfile.named(dockerfile.read(), "FROM")]
    assert re.fullmatch(r"python:\d+\.\d+(\.\d+)?-slim-[a-z]+", base), base
    assert "--variant=minbase --include=python3,python3-venv,ca-certificates" in SMOKE.read_text()


def test_smoke_script_does_what_the_machine_needs() -> None:
    text = SMOKE.read_text()
    for needed in (
        "--pull=never",
        "--isolation=chroot",
        "--format docker",  # keeps the HEALTHCHECK
        '--secret "id=pip_ca,src=$ca_bundle"',  # the CA bundle as a build secret, never a layer
        '--build-arg "TORCH_SPEC=/wheels/$(basename "$wheel")"',
        "--runtime runc",
        "--ulimit nofile=20000:20000 --ulimit nproc=1024:1024",
        "curl -N",
        "/v1/completions",
        'exec "$container" id -u',
        "healthcheck run",
        "stop --time 45",
    ):
        assert needed in text, needed
    assert "trap cleanup EXIT" in text
