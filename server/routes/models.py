"""GET /v1/models: the one model this server runs."""

from __future__ import annotations

import torch
from fastapi import APIRouter

from server.errors import NotFound
from server.openapi import error_responses
from server.protocol import ModelCard, ModelList
from server.state import EngineDep, StateDep

router = APIRouter()


def model_card(state: StateDep, engine: EngineDep) -> ModelCard:
    decoder = engine.runner.decoder
    planner = decoder.planner
    return ModelCard(
        id=state.settings.served_model_name(),
        created=state.started_at,
        max_model_len=engine.context_limit,
        window_size=planner.window_size,
        look_backward=planner.look_backward,
        depth=len(decoder.model.attention_layers),
        attention_span=planner.capacity,
        receptive_field=decoder.reach,
        chat_template=state.chat_template.origin,
        cpu_threads=torch.get_num_threads(),
    )


@router.get("/v1/models")
def list_models(state: StateDep, engine: EngineDep) -> ModelList:
    return ModelList(data=[model_card(state, engine)])


@router.get("/v1/models/{model_id}", responses=error_responses(404))
def get_model(model_id: str, state: StateDep, engine: EngineDep) -> ModelCard:
    card = model_card(state, engine)
    if model_id != card.id:
        raise NotFound(f"the model {model_id!r} does not exist", param="model", code="model_not_found")
    return card
