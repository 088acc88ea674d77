"""Request and response bodies of the rerank API, as pydantic models.

The rerank request and response are the shape Cohere's v1/v2 and Jina's rerank APIs use, and that
vLLM's ``/rerank`` copies; ``/score`` is vLLM's. ``/rerank`` also takes Text Embeddings
Inference's shape (``texts`` in place of ``documents``), answered as TEI answers. Unknown request fields (Cohere's
``max_tokens_per_doc`` or ``priority``, Jina's ``truncation``) are accepted and ignored: the
truncation is the model's scoring contract. A field that is wrong fails validation with an error
whose ``param`` names it (``documents[3]``, ``top_n``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from pydantic_core import PydanticCustomError


def _text_error(param: str, what: str, value: Any) -> PydanticCustomError:
    got = "an empty string" if isinstance(value, str) else _json_type(value)
    if isinstance(value, dict):
        got = f"an object with keys {sorted(value)}"
    return PydanticCustomError("invalid_text", "{param}: must be {what}, got {got}",
                               {"param": param, "what": what, "got": got})


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
             str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _check_texts(value: Any, field: str, allow_objects: bool) -> list[str]:
    """A list of non-empty strings (or ``{"text": str}`` objects when allowed), as strings."""
    what = ('a non-empty string or {"text": non-empty string}' if allow_objects
            else "a non-empty string")
    if not isinstance(value, list):
        raise PydanticCustomError("invalid_list", "{param}: must be a list of texts, got {got}",
                                  {"param": field, "got": _json_type(value)})
    if not value:
        raise PydanticCustomError("empty_list", "{param}: must hold at least one text",
                                  {"param": field})
    out = []
    for i, item in enumerate(value):
        text = item
        if allow_objects and isinstance(item, dict):
            text = item.get("text")
            if set(item) - {"text"} or not isinstance(text, str):
                raise _text_error(f"{field}[{i}]", what, item)
        if not isinstance(text, str) or not text.strip():
            raise _text_error(f"{field}[{i}]", what, text)
        out.append(text)
    return out


def _documents(value: Any) -> list[str]:
    return _check_texts(value, "documents", allow_objects=True)


def _one_or_many(field: str):
    def check(value: Any) -> str | list[str]:
        if isinstance(value, str):
            if not value.strip():
                raise _text_error(field, "a non-empty string or a list of them", value)
            return value
        return _check_texts(value, field, allow_objects=False)
    return check


def _query(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _text_error("query", "a non-empty string", value)
    return value


class DocumentText(BaseModel):
    """A document as an object (Cohere v1, Jina)."""

    text: str


class RerankRequest(BaseModel):
    """``POST /v1/rerank``, ``/v2/rerank``, ``/rerank``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Echoed back; the server serves one model.")
    query: Annotated[str, BeforeValidator(_query)]
    documents: Annotated[list[str | DocumentText], BeforeValidator(_documents)] = Field(
        description="Strings or {\"text\": ...} objects; at most --max-documents.")
    top_n: Annotated[int, Field(ge=1, strict=True)] | None = Field(
        None, description="Return the best top_n (all when absent or larger).")
    return_documents: StrictBool = Field(False, description="Echo each document's text.")


def _texts(value: Any) -> list[str]:
    return _check_texts(value, "texts", allow_objects=False)


class TeiRerankRequest(BaseModel):
    """Text Embeddings Inference's ``POST /rerank``, as its clients (Haystack, LlamaIndex,
    LangChain) send it."""

    model_config = ConfigDict(extra="ignore")

    query: Annotated[str, BeforeValidator(_query)]
    texts: Annotated[list[str], BeforeValidator(_texts)] = Field(
        description="The documents; at most --max-documents.")
    raw_scores: StrictBool = Field(False, description="The model's raw scores; false: their "
                                                       "sigmoid, as TEI gives them.")
    return_text: StrictBool = Field(False, description="Echo each text.")
    truncate: StrictBool | None = Field(
        None, description="Accepted; every pair is cut by the model's scoring contract.")
    truncation_direction: Literal["Right", "right"] = Field(
        "Right", description="Only Right: the contract cuts a document at its end.")


class TeiRerankResult(BaseModel):
    """One item of TEI's answer, a JSON list ordered by score, best first."""

    index: int
    score: float
    text: str | None = None


class ScoreRequest(BaseModel):
    """``POST /score`` (vLLM's): ``text_1`` is paired with each of ``text_2``, or the two lists
    are zipped."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    text_1: Annotated[str | list[str], BeforeValidator(_one_or_many("text_1"))]
    text_2: Annotated[str | list[str], BeforeValidator(_one_or_many("text_2"))]


class RerankResult(BaseModel):
    index: int
    """The document's position in the request."""
    relevance_score: float
    document: DocumentText | None = None


class ApiVersion(BaseModel):
    version: str


class MetaTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class Meta(BaseModel):
    """Cohere's ``meta``."""

    api_version: ApiVersion
    tokens: MetaTokens


class Usage(BaseModel):
    """Jina's and vLLM's ``usage``."""

    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    """Best first; ``index`` points into the request's documents."""
    meta: Meta
    usage: Usage


class ScoreItem(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreItem]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "megarank"
    root: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body (the OpenAI/vLLM error shape): ``param`` names the bad field."""

    object: Literal["error"] = "error"
    message: str
    type: str
    param: str | None = None
    code: int
