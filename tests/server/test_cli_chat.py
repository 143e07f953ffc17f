"""`windowlm chat` as a person runs it: a real process on a pseudo-terminal, typed at and interrupted with Ctrl+C,
talking to a real server or running a checkpoint in process; its answers checked against direct requests to
`/v1/chat/completions` with the same messages."""

from __future__ import annotations

import codecs
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from model.chat_template import DEFAULT_SOURCE
from server.cli import main
from server.config import BUNDLED_WEIGHTS
from tests.server.conftest import ServerProcess, free_port

pytestmark = pytest.mark.slow

PROMPT = "you> "
ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[=>])")  # what readline writes to set the terminal up
GREETING = "Good morrow, friend. What news?"
QUESTION = "Who goes there?"
VERONA = "A street in Verona."
LONG = "400"  # tokens of an answer that nothing stops early: time enough to interrupt it
SHORT = "120"  # tokens at most of the other answers: enough to tell them apart, quick to generate


class Terminal:
    """`windowlm chat ARGS` on a pseudo-terminal: what it writes, read with timeouts; keys typed to it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "server.cli", "chat", *args]
        environment = {**os.environ, "TERM": os.environ.get("TERM", "xterm"), **(env or {})}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, with the terminal as its controlling terminal
            try:
                os.execve(sys.executable, command, environment)
            finally:
                os._exit(127)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""  # read, not yet consumed

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """Everything up to and including `marker` (escapes and carriage returns left out)."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {marker!r} within {timeout} s; the terminal shows {self.pending[-2000:]!r}")
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the process has ended and closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"the chat ended before {marker!r}: {self.pending[-2000:]!r}")
            self.pending += ESCAPES.sub("", self.decoder.decode(data)).replace("\r", "")
        end = self.pending.index(marker) + len(marker)
        taken, self.pending = self.pending[:end], self.pending[end:]
        return taken

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def say(self, line: str) -> str:
        """Type a line, wait for the next prompt -> what was written in between, after the line's echo."""
        self.type(line + "\r")
        shown = self.read_until(PROMPT)
        return shown.split("\n", 1)[1].removesuffix(PROMPT)

    def answer(self, message: str) -> str:
        """The answer to a message: its text without the line that ends it."""
        return self.say(message).removesuffix("\n")

    def interrupt_answer(self, message: str) -> str:
        """Type a message, press Ctrl+C once its answer has begun -> the part shown before the cut."""
        self.type(message + "\r")
        self.read_until(message + "\n")
        self.read_until_more_than(20)
        self.type("\x03")
        shown = self.read_until("[cut]\n" + PROMPT)
        return shown.removesuffix("\n[cut]\n" + PROMPT).replace("^C", "")  # the terminal echoes the key as ^C

    def read_until_more_than(self, characters: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.pending) <= characters and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.05)[0]:
                self.pending += ESCAPES.sub("", self.decoder.decode(os.read(self.fd, 65536))).replace("\r", "")
        assert len(self.pending) > characters, f"no answer began: {self.pending!r}"

    def close(self) -> int:
        """Leave with /quit -> the exit status."""
        self.type("/quit\r")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        self.kill()
        raise AssertionError("the chat did not leave on /quit")

    def kill(self) -> None:
        """End the process if it still runs (a test that failed half-way)."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
            os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    """Terminal(...) once it shows its first prompt; ended after the test however it went."""
    started: list[Terminal] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Terminal:
        started.append(Terminal(*args, env=env))
        started[-1].read_until(PROMPT)
        return started[-1]

    yield start
    for chat in started:
        chat.kill()


def direct(server: ServerProcess, *turns: tuple[str, str], **fields: object) -> str:
    """The answer a direct request gives: turns are (role, content); greedy, SHORT tokens unless told."""
    messages = [{"role": role, "content": content} for role, content in turns]
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": int(SHORT), **fields}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def unstopped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """The bundled model under a chat template without end-of-turn stop strings: every answer runs to its
    max_tokens, long enough to be interrupted. Yields the server and the template file."""
    template = tmp_path_factory.mktemp("template") / "script.jinja"
    template.write_text(DEFAULT_SOURCE, encoding="utf-8")
    process = ServerProcess(BUNDLED_WEIGHTS, "--chat-template", str(template))
    yield process, template
    process.stop()


def test_a_conversation_with_a_server(bundled: ServerProcess, terminal: Callable[..., Terminal]) -> None:
    chat = terminal("--url", bundled.url, "--temperature", "0", "--max-tokens", SHORT)
    first = chat.answer(GREETING)
    assert first == direct(bundled, ("user", GREETING))
    second = chat.answer(QUESTION)  # the request carries the first turn
    assert second == direct(bundled, ("user", GREETING), ("assistant", first), ("user", QUESTION))
    alone = direct(bundled, ("user", QUESTION))
    assert second != alone  # so the comparison above says something

    assert "forgotten" in chat.say("/reset")
    assert chat.answer(QUESTION) == alone
    assert "set" in chat.say(f"/system {VERONA}")
    chat.say("/reset")  # the system message stays
    staged = chat.answer(GREETING)
    assert staged == direct(bundled, ("system", VERONA), ("user", GREETING))
    assert staged != first
    assert chat.say("/history") == f"system: {VERONA}\nyou: {GREETING}\nmodel: {staged}\n"
    assert chat.close() == 0


def test_in_process_gives_the_servers_text(bundled: ServerProcess, terminal: Callable[..., Terminal]) -> None:
    chat = terminal("--weights", str(BUNDLED_WEIGHTS), "--temperature", "0", "--max-tokens", SHORT, "--system", VERONA)
    first = chat.answer(GREETING)
    assert first == direct(bundled, ("system", VERONA), ("user", GREETING))
    second = chat.answer(QUESTION)
    assert second == direct(bundled, ("system", VERONA), ("user", GREETING), ("assistant", first), ("user", QUESTION))
    chat.say("/system")  # removed
    chat.say("/reset")
    assert chat.answer(QUESTION) == direct(bundled, ("user", QUESTION))
    assert chat.close() == 0


@pytest.mark.parametrize("where", ["server", "in process"])
def test_ctrl_c_cuts_an_answer_and_the_chat_goes_on(
    unstopped: tuple[ServerProcess, Path], terminal: Callable[..., Terminal], where: str
) -> None:
    server, template = unstopped
    flags = ["--temperature", "0", "--max-tokens", LONG]
    if where == "server":
        chat = terminal("--url", server.url, *flags)
    else:  # the same settings a server reads: the template comes from WINDOWLM_CHAT_TEMPLATE
        chat = terminal("--weights", str(BUNDLED_WEIGHTS), *flags, env={"WINDOWLM_CHAT_TEMPLATE": str(template)})
    cancelled = server.metric("windowlm_request_failures_total", reason="cancelled")

    partial = chat.interrupt_answer(GREETING)
    full = direct(server, ("user", GREETING), max_tokens=int(LONG))
    assert partial and full.startswith(partial) and len(partial) < len(full)
    if where == "server":  # the stream was closed, so the server cancelled the answer and freed its slot
        assert server.wait_metric("windowlm_request_failures_total", cancelled + 1, reason="cancelled") == cancelled + 1
        assert server.wait_metric("windowlm_kv_slots_used", 0) == 0

    chat.type("half a line\x03")  # at the prompt Ctrl+C drops the line and stays
    assert "dropped" in chat.read_until(PROMPT)
    assert chat.say("/history") == f"you: {GREETING}\nmodel: {partial} [cut]\n"
    after = chat.answer(QUESTION)  # the cut answer is part of the conversation
    turns = (("user", GREETING), ("assistant", partial), ("user", QUESTION))
    assert after == direct(server, *turns, max_tokens=int(LONG))
    assert chat.close() == 0


RUNTIME_ONLY = """
import sys
for name in ("httpx", "openai", "pytest", "hypothesis", "local_attention", "transformers", "matplotlib"):
    sys.modules[name] = None  # a dev or bench package cannot be imported, as where only the runtime is installed
from server.cli import main
sys.exit(main(["chat", *sys.argv[1:]]))
"""


def run_chat(*args: str, lines: str = "", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The command in a process of its own with the runtime dependencies alone, its input from a pipe -> (exit
    status, stdout, stderr)."""
    command = [sys.executable, "-c", RUNTIME_ONLY, *args]
    result = subprocess.run(
        command, input=lines.encode(), capture_output=True, timeout=120, env={**os.environ, **(env or {})}
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.fixture
def chat_here(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """The command's main in this process (no interpreter to start), its input the lines given -> (exit status,
    stdout, stderr)."""
    monkeypatch.delenv("WINDOWLM_API_KEY", raising=False)

    def run(*args: str, lines: str = "") -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
        status = main(["chat", *args])
        out, error = capsys.readouterr()
        return status, out, error

    return run


def test_no_server_says_how_to_start_one(chat_here: Callable[..., tuple[int, str, str]]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, _, error = chat_here("--url", url, lines="hello\n")
    assert status == 1
    assert f"no server is running at {url}" in error and "make serve" in error and "windowlm serve" in error


def test_a_missing_or_wrong_key_is_a_401_that_says_what_to_pass(
    relative_checkpoint: Path, chat_here: Callable[..., tuple[int, str, str]]
) -> None:
    server = ServerProcess(relative_checkpoint, "--api-key", "sesame")
    try:
        for flags in ([], ["--api-key", "wrong"]):
            status, _, error = chat_here("--url", server.url, *flags)
            assert status == 1 and "401" in error and "--api-key" in error, error
        flags = ["--temperature", "0", "--max-tokens", "12"]  # the key from the server's variable; no dev package
        status, out, error = run_chat("--url", server.url, *flags, lines="Hail!\n", env={"WINDOWLM_API_KEY": "sesame"})
        assert (status, error) == (0, "")
        assert out == direct(server, ("user", "Hail!"), max_tokens=12) + "\n"  # piped: the answers alone
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["server", "in process"])
def test_a_refused_request_shows_the_servers_words(
    server: ServerProcess, relative_checkpoint: Path, chat_here: Callable[..., tuple[int, str, str]], where: str
) -> None:
    target = ["--url", server.url] if where == "server" else ["--weights", str(relative_checkpoint)]
    status, out, error = chat_here(*target, "--max-tokens", "100000", lines="Hail!\n/history\n")
    assert status == 0
    assert "error: max_completion_tokens must be at most 16384" in error
    assert out == "(the conversation is empty)\n"  # the refused message did not join it


def test_bad_flags_are_refused_clearly(
    relative_checkpoint: Path, chat_here: Callable[..., tuple[int, str, str]]
) -> None:
    status, _, error = chat_here("--weights", str(relative_checkpoint), "--model", "other")
    assert status == 2 and "--model" in error
    status, _, error = chat_here("--threads", "2")
    assert status == 2 and "--threads" in error and "--weights" in error
    status, _, error = chat_here("--weights", str(relative_checkpoint.parent / "absent"))
    assert status == 1 and "not a checkpoint folder" in error
    status, _, error = chat_here("--url", "ftp://example")
    assert status == 1 and "--url must be an http:// or https:// address" in error


def test_control_characters_reach_a_terminal_as_escapes() -> None:
    """A model or a server must not command the terminal (here: OSC 52, write the clipboard; CSI in C1 form)."""
    from server.chat_command import visible

    assert visible("a\x1b]52;c;eA==\x07b\n\tc\x9bd é") == "a\\x1b]52;c;eA==\\x07b\n\tc\\x9bd é"
