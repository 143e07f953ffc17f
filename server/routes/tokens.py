"""POST /tokenize and /detokenize with the model's byte tokenizer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from model.tokenizer import ByteTokenizer
from server.body import json_body
from server.openapi import error_responses, json_request_body
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.state import EngineDep

router = APIRouter()
tokenizer = ByteTokenizer()


@router.post("/tokenize", responses=error_responses(400), openapi_extra=json_request_body(TokenizeRequest))
async def tokenize(
    body: Annotated[TokenizeRequest, Depends(json_body(TokenizeRequest))], engine: EngineDep
) -> TokenizeResponse:
    tokens = tokenizer.encode(body.prompt)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.context_limit)


@router.post("/detokenize", responses=error_responses(400), openapi_extra=json_request_body(DetokenizeRequest))
async def detokenize(
    body: Annotated[DetokenizeRequest, Depends(json_body(DetokenizeRequest))], engine: EngineDep
) -> DetokenizeResponse:
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))
