"""`windowlm chat`: a conversation in the terminal, with a running server (`--url`) or a checkpoint loaded in this
process (`--weights`), through the same chat template and sampling fields as `POST /v1/chat/completions`.

Each line typed is a message; the answer streams in as it comes. Ctrl+C while an answer streams cuts it: the
text so far stays in the conversation, marked as cut. Ctrl+C at the prompt drops the line being typed; Ctrl+D or
/quit leaves. Lines starting with `/` are commands (/help lists them); `//` sends a message that starts with `/`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from model.threads import THREADS_HELP
from server.chat_backends import ChatBackend, ChatError, HttpChat, InProcessChat

DEFAULT_URL = "http://127.0.0.1:8000"
PROMPT = "you> "
CUT_MARK = "[cut]"
USAGE_ERROR = 2
UNAVAILABLE = 1
INTERRUPTED = 130  # a shell's status for a command ended by Ctrl+C
HELP = """\
Type a message and press Enter; the answer streams in.
  /reset        forget the conversation (the system message stays)
  /system TEXT  set the system message (/system alone removes it)
  /history      show the conversation; answers cut short are marked [cut]
  /help         this text
  /quit         leave (also /exit, or Ctrl+D)
Ctrl+C stops an answer as it streams (what came stays, marked [cut]); at the prompt it drops the line typed.
Start a message with // to send one that begins with /."""
SAMPLING_KINDS = {
    "--temperature": float,
    "--top-p": float,
    "--top-k": int,
    "--min-p": float,
    "--presence-penalty": float,
    "--frequency-penalty": float,
    "--repetition-penalty": float,
    "--seed": int,
}


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=f"the server to talk to (default: {DEFAULT_URL})")
    where.add_argument(
        "--weights", default=None, metavar="DIR", help="run this checkpoint in this process instead of a server"
    )
    parser.add_argument("--model", default=None, help="model id on the server (default: the first /v1/models lists)")
    parser.add_argument(
        "--api-key", default=None, metavar="KEY", help="the server's API key (default: WINDOWLM_API_KEY's first)"
    )
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="PATH", help="the first key in this file")
    parser.add_argument("--system", default=None, metavar="TEXT", help="the system message to begin with")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=f"with --weights: {THREADS_HELP}")
    sampling = parser.add_argument_group("sampling", "the chat API's fields; what is not given takes the API's default")
    for flag, kind in SAMPLING_KINDS.items():
        sampling.add_argument(flag, type=kind, default=None, metavar="N" if kind is int else "X")
    sampling.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="longest answer (default: the server's --chat-max-tokens)",
    )
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")


CONTROL = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(code) not in "\n\t"}


def visible(text: str) -> str:
    """Text for a terminal: control characters (but newline and tab) as escapes, so a model or a server cannot
    send the terminal commands (colours, titles, the clipboard)."""
    return text.translate(CONTROL)


@dataclass
class Turn:
    user: str
    answer: str
    cut: bool = False


@dataclass
class Conversation:
    """The system message and the turns so far; a request's messages are these and the new message."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def messages(self, message: str) -> list[dict[str, str]]:
        history: list[dict[str, str]] = [] if self.system is None else [{"role": "system", "content": self.system}]
        for turn in self.turns:
            history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.answer}]
        return [*history, {"role": "user", "content": message}]

    def transcript(self) -> str:
        lines = [] if self.system is None else [f"system: {self.system}"]
        for turn in self.turns:
            lines += [f"you: {turn.user}", f"model: {turn.answer}" + (f" {CUT_MARK}" if turn.cut else "")]
        return "\n".join(lines) if lines else "(the conversation is empty)"


def run_chat(args: argparse.Namespace) -> int:
    problem = usage_problem(args)
    if problem is not None:
        print(f"windowlm chat: {problem}", file=sys.stderr)
        return USAGE_ERROR
    # Ctrl+C is how one stops an answer: it must raise KeyboardInterrupt even when this process was started with
    # SIGINT ignored (a background job of a shell does that, and Python then installs no handler of its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        backend = open_backend(args)
    except ChatError as error:
        print(f"windowlm chat: {error}", file=sys.stderr)
        return UNAVAILABLE
    except KeyboardInterrupt:  # while loading or connecting
        return INTERRUPTED
    try:
        Chat(backend, request_options(args), Conversation(args.system)).run()
    finally:
        backend.close()
    return 0


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the flags set, named as the chat API names them."""
    names = [flag.removeprefix("--").replace("-", "_") for flag in SAMPLING_KINDS]
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.max_tokens is not None:
        options["max_completion_tokens"] = args.max_tokens
    if args.stop:
        options["stop"] = args.stop
    return options


def usage_problem(args: argparse.Namespace) -> str | None:
    if args.weights is not None:
        given = [flag for flag, value in (("--model", args.model), ("--api-key", args.api_key)) if value is not None]
        if args.api_key_file is not None:
            given.append("--api-key-file")
        if given:
            return f"{', '.join(given)} name a server's model or key; with --weights the model is the checkpoint"
    elif args.threads is not None:
        return "--threads sets the threads of the model in this process: it goes with --weights"
    if args.threads is not None and args.threads < 1:
        return "--threads must be at least 1"
    return None


def open_backend(args: argparse.Namespace) -> ChatBackend:
    if args.weights is not None:
        from server.config import weights_folder

        try:
            folder = weights_folder(args.weights)
        except SystemExit as error:
            raise ChatError(str(error).removeprefix("windowlm: ")) from None
        return InProcessChat(folder, args.threads)
    return HttpChat(args.url or DEFAULT_URL, api_key(args), args.model)


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first key of --api-key-file, else the first of WINDOWLM_API_KEY (comma-separated,
    as the server reads it), else none."""
    if args.api_key is not None:
        return args.api_key
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ChatError(f"cannot read the API key file: {error}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ChatError(f"the API key file {args.api_key_file} holds no key")
        return keys[0]
    keys = [key.strip() for key in os.environ.get("WINDOWLM_API_KEY", "").split(",") if key.strip()]
    return keys[0] if keys else None


class HeldInterrupt:
    """Ctrl+C as KeyboardInterrupt, which also breaks a blocking read; inside `held()` it waits for the block's
    end instead, so that a piece of the answer is either shown and kept or neither."""

    def __init__(self) -> None:
        self.holding = False
        self.pending = False

    def handle(self, signum: int, frame: object) -> None:
        if not self.holding:
            raise KeyboardInterrupt
        self.pending = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


class Chat:
    """The loop: read a line, run a command or send a message, stream the answer, repeat."""

    def __init__(
        self,
        backend: ChatBackend,
        options: dict[str, Any],
        conversation: Conversation,
        out: TextIO | None = None,
    ) -> None:
        self.backend = backend
        self.options = options
        self.conversation = conversation
        self.out = out or sys.stdout
        self.interactive = sys.stdin.isatty()
        if self.interactive:
            with contextlib.suppress(ImportError):  # line editing and history with the arrow keys
                import readline  # noqa: F401

    def run(self) -> None:
        if self.interactive:
            self.say(f"Chatting with {self.backend.model} ({self.backend.where}). /help for commands, Ctrl+D to leave.")
        while True:
            try:
                line = input(PROMPT if self.interactive else "")
            except EOFError:
                if self.interactive:
                    self.say("")
                return
            except KeyboardInterrupt:
                self.say("\n(the line was dropped; Ctrl+D or /quit leaves)")
                continue
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return
            else:
                self.send(line.removeprefix("/"))

    def command(self, line: str) -> bool:
        """Carry out a command; False when it is /quit."""
        name, _, text = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.conversation.turns.clear()
            kept = "; the system message stays" if self.conversation.system else ""
            self.say(f"(conversation forgotten{kept})")
        elif name == "/system":
            self.conversation.system = text.strip() or None
            self.say("(system message set)" if text.strip() else "(system message removed)")
        elif name == "/history":
            self.say(self.conversation.transcript())
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"(unknown command {name}; /help lists them)")
        return True

    def send(self, message: str) -> None:
        """Stream the answer to `message`; it joins the conversation when it ends or is cut, not when it fails."""
        body = {"model": self.backend.model, "messages": self.conversation.messages(message), "stream": True}
        answer = ""
        ctrl_c = HeldInterrupt()
        try:
            with ctrl_c.installed(), contextlib.closing(self.backend.stream({**body, **self.options})) as pieces:
                for piece in pieces:
                    with ctrl_c.held():  # what is shown is what the conversation keeps
                        self.out.write(visible(piece) if self.out.isatty() else piece)
                        self.out.flush()
                        answer += piece
        except ChatError as error:
            if answer:
                self.say("")
            print(f"error: {error}", file=sys.stderr, flush=True)
            return
        except KeyboardInterrupt:
            self.conversation.turns.append(Turn(message, answer, cut=True))
            self.say(f"\n{CUT_MARK}")
            return
        self.conversation.turns.append(Turn(message, answer))
        self.say("")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
