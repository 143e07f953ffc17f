"""POST /tokenize and /detokenize with the model's byte tokenizer."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from model.tokenizer import VOCAB_SIZE, ByteTokenizer
from server.errors import InvalidRequest
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.state import EngineDep, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])
tokenizer = ByteTokenizer()


@router.post("/tokenize")
def tokenize(body: TokenizeRequest, engine: EngineDep) -> dict:
    tokens = tokenizer.encode(body.prompt)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_limit}


@router.post("/detokenize")
def detokenize(body: DetokenizeRequest, engine: EngineDep) -> dict:
    if any(not 0 <= token < VOCAB_SIZE for token in body.tokens):
        raise InvalidRequest(f"token ids must be in 0..{VOCAB_SIZE - 1}", param="tokens")
    return {"prompt": tokenizer.decode(body.tokens)}
