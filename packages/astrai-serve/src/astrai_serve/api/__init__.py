"""The OpenAI-compatible HTTP API of astrai-serve: `create_app` around an `InferenceEngine` (or
a loader of one), its `ServerConfig`, and the request models (the seed's `ChatMessage` and
`ChatCompletionRequest`). `astrai_serve.api.server.serve` runs an app under uvicorn with a
clean shutdown; `astrai serve` is that, from the command line."""

from astrai_serve.api.app import create_app
from astrai_serve.api.errors import APIError
from astrai_serve.api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from astrai_serve.api.state import ServerConfig

__all__ = ["APIError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest",
           "ServerConfig", "create_app"]
