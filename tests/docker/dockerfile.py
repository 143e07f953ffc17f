"""Just enough of a Dockerfile reader for the tests: instructions with their arguments, ENV, exec forms.

Continuation lines are joined and comment lines dropped, as Docker does; variables are not expanded.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the (joined) line
    line: int  # where it starts, 1-based

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """`--name=value` flags at the start of the arguments (RUN --mount, HEALTHCHECK --interval, COPY --chown)."""
        flags: dict[str, str] = {}
        rest = self.args
        while match := re.match(r"--([\w-]+)=(\S+)\s+", rest):
            flags[match.group(1)] = match.group(2)
            rest = rest[match.end() :]
        return flags, rest


def read(path: Path = DOCKERFILE) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # a comment, also inside a continued instruction
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    return instructions


def named(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def env(instructions: list[Instruction]) -> dict[str, str]:
    """Every ENV, in order (later ones win), in both forms: `ENV K=V K2=V2` and the legacy `ENV K V`."""
    values: dict[str, str] = {}
    for instruction in named(instructions, "ENV"):
        words = shlex.split(instruction.args)
        if "=" not in words[0]:
            values[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            values[key] = value
    return values


def exec_form(args: str) -> list[str]:
    """The JSON array of ENTRYPOINT, CMD or HEALTHCHECK CMD; shell form is refused (it breaks signals)."""
    value = json.loads(args)
    if not (isinstance(value, list) and all(isinstance(word, str) for word in value)):
        raise ValueError(f"not an exec form: {args}")
    return value


def command_line(instructions: list[Instruction]) -> list[str]:
    """What the container runs: ENTRYPOINT, then CMD (the arguments `docker run IMAGE ...` replaces)."""
    entrypoint = named(instructions, "ENTRYPOINT")
    cmd = named(instructions, "CMD")
    return (exec_form(entrypoint[-1].args) if entrypoint else []) + (exec_form(cmd[-1].args) if cmd else [])


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    _, rest = named(instructions, "HEALTHCHECK")[-1].flags_and_rest()
    keyword, _, command = rest.partition(" ")
    if keyword.upper() != "CMD":
        raise ValueError(f"HEALTHCHECK has no CMD: {rest}")
    return exec_form(command)
