"""The REST API's OpenAPI description, completed where FastAPI cannot see the API.

FastAPI describes routes from their signatures. The inference, image and repository routes
read their bodies themselves (JSON, JSON + binary tensors, images), and every error is
answered as ``{"error": ...}`` with the error table's status (:mod:`cnnserve.protocol.status`)
— never FastAPI's 422. So :func:`describe_api` adds what is missing to the generated
document: the request bodies, the error statuses each route really returns, the response
bodies, the model names served at the time of asking, and drops the 422s. Client generators
and fuzzers (schemathesis) read ``/openapi.json``; it has to be the API as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cnnserve.models.features import FEATURE_LAYERS
from cnnserve.models.semantics import FORMAT_OPTION, TOP_K_OPTION, MaskFormat, ReplyOptions
from cnnserve.models.spec import Architecture
from cnnserve.protocol.domain import DATATYPES

from .auth import HEALTH_PATHS
from .model_manager import ModelState
from .pictures import GRID_SHAPE_HEADER, LAYER_SHAPE_HEADER, TILE_SHAPE_HEADER

#: What each error status means, from the error table.
ERROR_MEANINGS = {
    "400": "Bad input: the body, a tensor's shape, datatype or size, an undecodable image, "
    "or an unsafe model name.",
    "404": "The model (or version) is not served here, or not in the model repository.",
    "413": "The request is over a size limit (body bytes or items per request).",
    "429": "The model's queue is full; retry later.",
    "503": "The model is not ready, its backend is down, the server is shutting down, a "
    "model could not be loaded, or the server does not load models on request.",
    "504": "The request's deadline passed before it could be answered.",
    "500": "An unexpected error; the server logged the details.",
    "401": "No API key, or one the gateway does not accept: send `authorization: Bearer <key>`.",
}
#: How a caller sends its API key when the gateway has keys (:mod:`.auth`): Swagger UI at
#: /docs then offers "Authorize", and sends the key with every call it tries.
SECURITY_SCHEMES = {
    "ApiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the gateway's API keys, as `authorization: Bearer <key>`.",
    }
}
ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}
_SCALAR = {"anyOf": [{"type": t} for t in ("string", "number", "integer", "boolean")]}
_PARAMETERS = {"type": "object", "additionalProperties": _SCALAR}
_STRING = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}
_DURATION = {"$ref": "#/components/schemas/StatisticDuration"}
_DIMS = {"type": "array", "items": {"type": "integer", "minimum": -1}}
_DATA_TYPE = {"type": "string", "pattern": "^TYPE_[A-Z0-9]+$"}
#: The Open Inference Protocol's REST bodies ($inference_request, $inference_response).
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What went wrong."}},
    },
    "Parameters": _PARAMETERS,
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/RequestOutput"},
            },
        },
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "enum": ["input", "pixels", "image"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
            "data": {"type": "array", "description": "Elements, flat or nested, row-major."},
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "parameters": {"$ref": "#/components/schemas/Parameters"},
                        "data": {"type": "array"},
                    },
                },
            },
        },
    },
}
#: Bodies of Triton's model repository, configuration and statistics extensions.
REPOSITORY_SCHEMAS: dict[str, Any] = {
    "RepositoryIndexRequest": {
        "type": "object",
        "properties": {"ready": {"type": "boolean", "description": "READY versions only."}},
    },
    "RepositoryIndex": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "state"],
            "properties": {
                "name": _STRING,
                "version": {**_STRING, "description": "Absent: the model has none."},
                "state": {"type": "string", "enum": [s.value for s in ModelState]},
                "reason": {**_STRING, "description": "Why it is in this state."},
            },
        },
    },
    "RepositoryRequest": {
        "type": "object",
        "properties": {"parameters": {"$ref": "#/components/schemas/Parameters"}},
    },
    "StatisticDuration": {
        "type": "object",
        "required": ["count", "ns"],
        "properties": {"count": _COUNT, "ns": _COUNT},
    },
    "ModelStatistics": {
        "type": "object",
        "required": ["model_stats"],
        "properties": {
            "model_stats": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "version", "inference_stats", "batch_stats"],
                    "properties": {
                        "name": _STRING,
                        "version": _STRING,
                        "last_inference": {**_COUNT, "description": "ms since the epoch"},
                        "inference_count": {**_COUNT, "description": "items inferred"},
                        "execution_count": {**_COUNT, "description": "batches run"},
                        "inference_stats": {
                            "type": "object",
                            "additionalProperties": _DURATION,
                        },
                        "batch_stats": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["batch_size"],
                                "properties": {"batch_size": _COUNT},
                                "additionalProperties": _DURATION,
                            },
                        },
                    },
                },
            }
        },
    },
    "ModelConfig": {
        "type": "object",
        "description": "Triton's model configuration (model_config.proto), as Triton "
        "renders it in JSON.",
        "required": ["name", "platform", "backend", "max_batch_size", "input", "output"],
        "properties": {
            "name": _STRING,
            "platform": _STRING,
            "backend": _STRING,
            "max_batch_size": _COUNT,
            "version_policy": {"type": "object"},
            "input": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "data_type", "dims"],
                    "properties": {
                        "name": _STRING,
                        "data_type": _DATA_TYPE,
                        "format": {"type": "string", "pattern": "^FORMAT_"},
                        "dims": _DIMS,
                        "optional": {"type": "boolean"},
                    },
                },
            },
            "output": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "data_type", "dims"],
                    "properties": {"name": _STRING, "data_type": _DATA_TYPE, "dims": _DIMS},
                },
            },
            "dynamic_batching": {"type": "object"},
        },
    },
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_INFER_BODY = {
    "required": True,
    "description": "JSON, or Triton's binary tensor extension: the JSON header (its length "
    "in the Inference-Header-Content-Length header), then the raw tensors.",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
        "application/octet-stream": _BINARY,
    },
}
_IMAGE_BODY = {
    "required": True,
    "description": "One PNG/JPEG as the raw body, or image files in a multipart form.",
    "content": {
        "image/png": _BINARY,
        "image/jpeg": _BINARY,
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        },
    },
}


#: The features route's ``layer`` parameter: what each architecture offers.
LAYER_DESCRIPTION = (
    "rgb (the image's R, G and B channels, as the network is given them) or a feature map of "
    "the model's architecture — "
    + "; ".join(f"{a.value}: {', '.join(FEATURE_LAYERS[a])}" for a in Architecture)
    + ". A version exported without feature maps offers rgb only."
)
_PICTURE_HEADERS = {
    LAYER_SHAPE_HEADER: "The drawn layer's shape: C,H,W (maps, channels) or N (a vector).",
    GRID_SHAPE_HEADER: "The grid's rows,columns of tiles (2-pixel white gaps around each).",
    TILE_SHAPE_HEADER: "One tile's height,width in pixels.",
}
_PNG = {"image/png": _BINARY}


def option_parameters() -> list[dict[str, Any]]:
    """The friendly route's query parameters: the reply options, with their defaults."""
    defaults = ReplyOptions()
    schemas = {
        TOP_K_OPTION: {"type": "integer", "minimum": 1, "default": defaults.top_k},
        FORMAT_OPTION: {
            "type": "string",
            "enum": [f.value for f in MaskFormat],
            "default": defaults.format.value,
        },
    }
    return [
        {
            "name": option.name,
            "in": "query",
            "required": False,
            "description": option.description,
            "schema": schema,
        }
        for option, schema in schemas.items()
    ]


def _errors(*codes: str) -> dict[str, Any]:
    return {
        code: {
            "description": ERROR_MEANINGS[code],
            "content": {"application/json": {"schema": ERROR_SCHEMA}},
        }
        for code in codes
    }


def _health(key: str, *extra: str) -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": [key, *extra],
        "properties": {key: {"type": "boolean"}, **{e: {"type": "string"} for e in extra}},
    }
    content = {"application/json": {"schema": schema}}
    return {
        "200": {"description": f"{key}: true", "content": content},
        "503": {"description": f"{key}: false", "content": content},
    }


def _json_body(schema: str, description: str) -> dict[str, Any]:
    return {
        "required": False,
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _ok(schema: str, description: str) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    return {"200": {"description": description, "content": content}}


def _repository_extras(path: str) -> dict[str, Any]:
    """Triton's repository, configuration and statistics routes."""
    if path == "/v2/repository/index":
        return {
            "requestBody": _json_body("RepositoryIndexRequest", "Optional."),
            "responses": {**_ok("RepositoryIndex", "The index."), **_errors("400", "500")},
        }
    if path.startswith("/v2/repository/models/"):
        done = {"application/json": {"schema": {"type": "object", "maxProperties": 0}}}
        return {
            "requestBody": _json_body(
                "RepositoryRequest", "Optional; unload takes parameter unload_dependents."
            ),
            "responses": {
                "200": {"description": "Done.", "content": done},
                **_errors("400", "404", "500", "503"),
            },
        }
    if path.endswith("/stats"):
        ok = _ok("ModelStatistics", "Statistics of the loaded versions asked for.")
        return {"responses": {**ok, **_errors("400", "404", "500")}}
    ok = _ok("ModelConfig", "The model configuration.")
    return {"responses": {**ok, **_errors("400", "404", "500", "503")}}


def _operation_extras(path: str) -> dict[str, Any]:
    """The request body and responses of one operation, by the shape of its path."""
    if path.startswith("/v2/repository/") or path.endswith(("/stats", "/config")):
        return _repository_extras(path)
    if path.endswith("/features") or path.startswith("/demo/"):
        return _picture_extras(path)
    return _oip_extras(path)


def _picture_extras(path: str) -> dict[str, Any]:
    """The routes that answer pictures: a layer's grid, a demo scene."""
    if path.startswith("/demo/"):
        ok = {"description": "The scene, an RGB PNG.", "content": _PNG}
        return {"responses": {"200": ok, **_errors("400", "500")}}
    ok = {
        "description": "The layer's grid, a grey PNG.",
        "content": _PNG,
        "headers": {
            name: {"description": description, "schema": {"type": "string"}}
            for name, description in _PICTURE_HEADERS.items()
        },
    }
    responses = {"200": ok, **_errors("400", "404", "413", "429", "500", "503", "504")}
    return {
        "requestBody": {**_IMAGE_BODY, "description": "One PNG/JPEG image."},
        "responses": responses,
    }


def _oip_extras(path: str) -> dict[str, Any]:
    """The Open Inference Protocol's routes and the friendly image route."""
    if path.endswith("/infer"):
        ok = {
            "description": "The requested outputs (binary tensors follow the JSON when asked).",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
                "application/octet-stream": _BINARY,
            },
        }
        responses = {"200": ok, **_errors("400", "404", "413", "429", "500", "503", "504")}
        return {"requestBody": _INFER_BODY, "responses": responses}
    if path.startswith("/predict/"):
        ok = {
            "description": "convnet: labels as JSON; fcn: the mask as a PNG, or counts as JSON.",
            "content": {"application/json": {"schema": {"type": "object"}}, "image/png": _BINARY},
        }
        responses = {"200": ok, **_errors("400", "404", "413", "429", "500", "503", "504")}
        return {"requestBody": _IMAGE_BODY, "responses": responses}
    if path.endswith("/ready") and "/models/" in path:
        return {"responses": {**_health("ready", "name"), **_errors("404", "500")}}
    if path.startswith("/v2/health/"):
        return {"responses": _health(path.rsplit("/", 1)[-1])}
    if "/models/" in path:
        return {"responses": {**_errors("404", "500")}}
    return {}


def describe_api(app: FastAPI, models: Callable[[], Sequence[str]], api_keys: bool = False) -> None:
    """Make ``app.openapi()`` return the completed description, listing the models
    ``models()`` names when asked (built again only when they changed); with ``api_keys``,
    every operation but health needs the key (:data:`SECURITY_SCHEMES`) and may answer 401."""
    described: list[tuple[str, ...]] = []

    def openapi() -> dict[str, Any]:
        served = tuple(models())
        if app.openapi_schema is None or described != [served]:
            app.openapi_schema = _complete(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    routes=app.routes,
                ),
                served,
                api_keys,
            )
            described[:] = [served]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(document: dict[str, Any], models: Sequence[str], api_keys: bool) -> dict[str, Any]:
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            extras = _operation_extras(path)
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400s here
            responses.update(extras.get("responses", {}))
            if api_keys and path in HEALTH_PATHS:
                operation["security"] = []  # probes need no key
            elif api_keys:
                responses.update(_errors("401"))
            if "requestBody" in extras:
                operation["requestBody"] = extras["requestBody"]
            # Load and unload take any folder of the repository, served or not.
            served = () if path.startswith("/v2/repository/") else models
            for parameter in operation.get("parameters", []):
                _describe_parameter(parameter, served)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(SCHEMAS)
    schemas.update(REPOSITORY_SCHEMAS)
    if api_keys:
        document["components"]["securitySchemes"] = SECURITY_SCHEMES
        document["security"] = [{name: []} for name in SECURITY_SCHEMES]
    return document


def _describe_parameter(parameter: dict[str, Any], models: Sequence[str]) -> None:
    if parameter.get("in") != "path":
        return
    schema = parameter.setdefault("schema", {})
    if parameter.get("name") == "model" and models:
        schema["enum"] = list(models)
    elif parameter.get("name") == "version":
        schema["pattern"] = "^[1-9][0-9]*$"
