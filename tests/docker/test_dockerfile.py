"""The Dockerfile's promises, read from the file, and hadolint on it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import Settings
from tests.docker import dockerfile
from tests.docker.dockerfile import DOCKERFILE, ROOT, named

INSTRUCTIONS = dockerfile.read()
SOURCE_DIRS = ("model", "server", "weights")


def tool(name: str) -> str:
    """A command installed by the dev extra: next to this Python first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ignored_hadolint_rule_is_justified_next_to_it() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if match := re.search(r"hadolint\s+(?:global\s+)?ignore=([\w,]+)", line):
            justification = "\n".join(lines[max(0, number - 4) : number])
            for rule in match.group(1).split(","):
                assert rule in justification, f"line {number + 1}: {rule} is ignored without a comment saying why"


def test_base_image_is_pinned_to_a_version() -> None:
    for instruction in named(INSTRUCTIONS, "FROM"):
        image = instruction.args.split()[0]
        assert "$" not in image, f"line {instruction.line}: the base is a variable"
        _, _, tag = image.partition(":")
        assert tag and tag != "latest", f"line {instruction.line}: {image} has no pinned tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"line {instruction.line}: {image}'s tag names no exact version"


def test_torch_default_is_a_pinned_build_from_pips_configured_index() -> None:
    args = dict(a.args.split("=", 1) for a in named(INSTRUCTIONS, "ARG") if "=" in a.args)
    assert re.fullmatch(r'"?torch==\d+\.\d+\.\d+[^"]*"?', args["TORCH_SPEC"]), args["TORCH_SPEC"]
    assert args["TORCH_INDEX_URL"].strip('"') == "", "TORCH_INDEX_URL must default to pip's own configured index"
    (install,) = [r for r in named(INSTRUCTIONS, "RUN") if '"${TORCH_SPEC}"' in r.args]
    assert '${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}' in install.args, "an empty index must pass no flag"


def test_runs_as_a_numeric_non_root_user() -> None:
    users = named(INSTRUCTIONS, "USER")
    assert users, "no USER: the server would run as root"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1].args}: use a numeric uid other than 0"
    assert users[-1].line > max(i.line for i in named(INSTRUCTIONS, "RUN")), "USER comes before the last RUN"


def test_exposes_8000_and_stops_with_sigterm() -> None:
    exposed = {word.split("/")[0] for e in named(INSTRUCTIONS, "EXPOSE") for word in e.args.split()}
    assert "8000" in exposed
    assert dockerfile.env(INSTRUCTIONS)["WINDOWLM_PORT"] == "8000"
    assert [s.args for s in named(INSTRUCTIONS, "STOPSIGNAL")] == ["SIGTERM"]


def test_healthcheck_asks_health_with_the_images_python() -> None:
    command = dockerfile.healthcheck_command(INSTRUCTIONS)
    assert command[0] == "/opt/venv/bin/python"
    assert "/health" in command[-1]
    assert not any(word in " ".join(command) for word in ("curl", "wget"))
    flags, _ = named(INSTRUCTIONS, "HEALTHCHECK")[-1].flags_and_rest()
    assert {"interval", "timeout", "start-period", "retries"} <= flags.keys()


def test_entrypoint_is_windowlm_serve_in_exec_form() -> None:
    assert dockerfile.command_line(INSTRUCTIONS)[:2] == ["windowlm", "serve"]


def test_every_windowlm_variable_is_a_setting_and_the_weights_are_bundled() -> None:
    variables = {k: v for k, v in dockerfile.env(INSTRUCTIONS).items() if k.startswith("WINDOWLM_")}
    fields = {f"WINDOWLM_{name.upper()}" for name in Settings.model_fields}
    assert variables.keys() <= fields, variables.keys() - fields
    assert variables["WINDOWLM_HOST"] == "0.0.0.0"
    copied_to = [i.args.split()[-1].rstrip("/") for i in named(INSTRUCTIONS, "COPY") if "weights/default" in i.args]
    assert variables["WINDOWLM_WEIGHTS"] in copied_to
    assert "PIP_CERT" not in dockerfile.env(INSTRUCTIONS), "the build's CA bundle must not be baked in"


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    runs = named(INSTRUCTIONS, "RUN")
    installs = [r for r in runs if "pip install" in r.args and "--requirement" in r.args]
    assert installs, "no RUN installs the dependencies with pip install --requirement"
    dependency_layer = installs[0]
    copies = named(INSTRUCTIONS, "COPY")
    before = [c for c in copies if c.line < dependency_layer.line]
    assert before and all(c.args.split()[:-1] == ["pyproject.toml"] for c in before), [c.args for c in before]
    source_copies = [c for c in copies if any(f"{d}/" in c.args for d in SOURCE_DIRS) and "default" not in c.args]
    assert {d for c in source_copies for d in SOURCE_DIRS if f"{d}/" in c.args} == set(SOURCE_DIRS)
    assert all(c.line > dependency_layer.line for c in source_copies)
    install_source = [r for r in runs if "--no-deps" in r.args]
    assert install_source and install_source[0].line > max(c.line for c in source_copies)


# .dockerignore, with Docker's rules: the last matching pattern wins, a pattern that matches a folder matches all
# below it, `**` crosses folders and `*` does not.


def _pattern(text: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    verdict = False
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = _pattern(line.lstrip("!").strip("/"))
        if any(pattern.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            verdict = not negated
    return verdict


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".cache/smoke/rootfs-bookworm/etc/passwd",
        "tests/server/conftest.py",
        "docker/compose.yaml",
        "server/__pycache__/app.cpython-311.pyc",
        "windowlm.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/nodeids",
        "weights/default/.model.safetensors.tmp",
        "Makefile",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path)


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    for copy in named(INSTRUCTIONS, "COPY"):
        _, rest = copy.flags_and_rest()
        for source in rest.split()[:-1]:
            paths = [p.relative_to(ROOT).as_posix() for p in ROOT.glob(source.rstrip("/"))] or [source.rstrip("/")]
            for path in paths:
                probe = f"{path}/config.json" if path.endswith("weights/default") else path
                assert not ignored(probe), f"line {copy.line}: {probe} is left out of the build context"
