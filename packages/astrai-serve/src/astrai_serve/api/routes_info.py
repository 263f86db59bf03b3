"""`GET /v1/models`, `/health` and `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from astrai_serve.api.errors import APIError, OpenAIJSONResponse
from astrai_serve.api.generation import serving_state
from astrai_serve.api.metrics import CONTENT_TYPE
from astrai_serve.api.responses import ModelCard, ModelList, error_responses
from astrai_serve.api.state import ServingState

router = APIRouter()


def _cards(state: ServingState) -> list[ModelCard]:
    """The base model, then each LoRA adapter served beside it (`parent`: the base)."""
    window = state.engine.scheduler.max_seq_len if state.engine is not None else None
    base, *adapters = state.model_names()
    return [ModelCard(id=base, created=state.created, max_model_len=window),
            *(ModelCard(id=name, created=state.created, max_model_len=window, parent=base)
              for name in adapters)]


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    """The base model this server serves and its LoRA adapters."""
    return ModelList(data=_cards(serving_state(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            responses=error_responses(401, 404))
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    cards = {card.id: card for card in _cards(serving_state(request))}
    if model_id not in cards:
        raise APIError(404, f"model '{model_id}' does not exist; this server serves "
                       f"{', '.join(repr(n) for n in cards)}", param="model",
                       code="model_not_found")
    return cards[model_id]


@router.get("/health", responses={503: {"description": "Loading, failed or shutting down."}})
async def health(request: Request) -> Response:
    """200 while serving; 503 while the model loads, after the engine failed, or on shutdown."""
    problem = serving_state(request).problem()
    if problem is None:
        return OpenAIJSONResponse({"status": "ok"})
    return OpenAIJSONResponse({"status": problem.code, "message": problem.message},
                              status_code=503, headers=problem.headers)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(serving_state(request).metrics.render(), media_type=CONTENT_TYPE)
