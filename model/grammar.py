"""Constrained generation at the byte level: a grammar says which bytes may come next, and when the text may end.

A token of this model is one byte, so a constraint is exact: every text the grammar allows can be generated, and
nothing else, with no token-boundary effects. The matching is llguidance's (JSON schema, regular expression,
Lark grammar, choice among strings), given the 256 single bytes as its vocabulary plus one token of its own that
stands for the end of the text (END, id 256): a grammar that is complete allows END.

    grammar = compile_grammar(GrammarSpec("regex", "[0-9]{4}-[0-9]{2}"))   # raises GrammarError if invalid
    matcher = grammar.matcher()            # one per sequence, in the grammar's initial state
    allowed = masks([matcher])             # (1, 257) bool: the 256 bytes, then END
    matcher.consume(ord("2"))              # after a byte is sampled

How the text ends (model.sampling does it): the model has no end-of-text token, so END takes, as its logit, the
log of the total probability of the bytes the grammar forbids. The text ends where the model would have left
the language; where the grammar cannot end yet, those bytes' probability goes to the bytes it allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import llguidance
import torch
from torch import Tensor

BYTES = 256
END = BYTES  # the token id that stands for the end of the constrained text
MASK_BYTES = (BYTES + 1 + 31) // 32 * 4  # llguidance's mask: one bit per token, in 32-bit words
FORCED_START = 64  # bytes of a grammar's forced start that compiling checks (a JSON object's "{" and its key)
GrammarKind = Literal["json_schema", "regex", "grammar", "choice"]


class GrammarError(ValueError):
    """The constraint library rejected a schema, pattern or grammar; the message is its reason."""


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint as text: a JSON schema (serialised), a regular expression, a Lark grammar (llguidance's
    syntax; GBNF is converted), or a JSON list of strings to choose among."""

    kind: GrammarKind
    text: str


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds on what compiling and matching one grammar may cost (llguidance's own limits).

    An ambiguous grammar (`a: a a | "x"`) grows the parser's rows by one item a byte, and a step's cost with
    them. llguidance's default of 2,000 items a row let one such grammar take up to 860 ms a byte and 136 s in
    all before it failed; at 500, 9 ms a byte and 0.6 s in all, while an anyOf of 400 object alternatives still
    fits (measured on this project's 2-core CPU)."""

    max_items_in_row: int = 500
    max_grammar_symbols: int = 500_000
    max_lexer_states: int = 250_000
    step_lexer_fuel: int = 200_000

    def parser_limits(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(
            max_items_in_row=self.max_items_in_row,
            max_grammar_size=self.max_grammar_symbols,
            max_lexer_states=self.max_lexer_states,
            step_lexer_fuel=self.step_lexer_fuel,
            verbose_errors=False,
        )


class _ByteVocabulary:
    """What llguidance asks of a tokenizer: the bytes of every token, an end-of-sequence id, and encoding."""

    def __init__(self) -> None:
        self.eos_token_id = END
        self.bos_token_id = None
        self.tokens = [bytes([byte]) for byte in range(BYTES)] + [b"<end>"]
        self.special_token_ids = [END]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


_VOCABULARY = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()))


def _grammar_text(spec: GrammarSpec) -> str:
    """The spec in llguidance's own grammar form (not yet checked)."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.text)
        except json.JSONDecodeError as error:
            raise GrammarError(f"the schema is not JSON: {error}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema is an object (or a boolean), not {type(schema).__name__}")
        # Compact JSON ("," and ":" with no spaces): a model that knows no JSON could otherwise pad it with
        # whitespace forever, and every byte costs a step.
        options = {"whitespace_flexible": False}
        return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=options)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    try:  # a choice list that is not JSON, or a grammar that is neither Lark nor GBNF
        return llguidance.grammar_from("choice" if spec.kind == "choice" else "grammar", spec.text)
    except ValueError as error:
        raise GrammarError(str(error)) from None


class Grammar:
    """A compiled constraint; `matcher()` gives each sequence its own state. Immutable and shareable."""

    def __init__(self, spec: GrammarSpec, limits: GrammarLimits | None = None) -> None:
        self.spec = spec
        limits = limits or GrammarLimits()
        text = _grammar_text(spec)
        self._initial = llguidance.LLMatcher(_VOCABULARY, text, log_level=0, limits=limits.parser_limits())
        if self._initial.is_error():  # the library's whole message: where in the text, and why
            raise GrammarError(self._initial.get_error())
        self._check_start()

    def _check_start(self) -> None:
        """Raise GrammarError for a grammar that fails at once: one whose language is empty, or whose parser
        goes over a limit within its forced start (an object schema of 1,000 optional properties, after `{`)."""
        first = self.matcher()
        first.mask_bytes()
        if first.error is None and not first.complete:
            forced = first._matcher.compute_ff_bytes()[:FORCED_START]  # a regex may force a million bytes
            first._matcher.consume_tokens(list(forced))
            first.mask_bytes()
        if first.error is not None:
            raise GrammarError(first.error)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._initial.deep_copy())


def compile_grammar(spec: GrammarSpec, limits: GrammarLimits | None = None) -> Grammar:
    return Grammar(spec, limits)


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def mask_bytes(self) -> bytes:
        """The allowed tokens as llguidance's bitmask (MASK_BYTES bytes, token t at bit t % 8 of byte t // 8)."""
        return self._matcher.compute_bitmask()

    def consume(self, token: int) -> None:
        """Advance past a sampled byte; raises GrammarError if the grammar refused it or went over a limit."""
        if not self._matcher.consume_token(token):
            raise GrammarError(f"at byte {token} of the text: {self.error}")

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a limit of GrammarLimits, a refused byte, a language with no text), None while
        it has not. A failed matcher's mask allows only END: read this before taking END for a complete text."""
        if not self._matcher.is_error():
            return None
        reason = self._matcher.get_error().split("\n", 1)[0]
        return "the grammar allows no text here" if reason.startswith("NoExtension") else reason

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more: only END is left (check `error` first)."""
        return self._matcher.is_stopped()


_BIT = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8)  # (8,)


def masks(matchers: list[GrammarMatcher], device: torch.device | str = "cpu") -> Tensor:  # (B, 257) bool
    """The tokens each matcher allows next: (B, 257), the 256 bytes then END, on `device`."""
    packed = torch.frombuffer(bytearray(b"".join(m.mask_bytes() for m in matchers)), dtype=torch.uint8)
    bits = packed.view(len(matchers), MASK_BYTES, 1) & _BIT  # (B, MASK_BYTES, 8)
    return (bits != 0).flatten(1)[:, : BYTES + 1].to(device)  # (B, 257)
