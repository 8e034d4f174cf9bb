"""Request and response bodies; their examples feed the OpenAPI page at ``/docs``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EXAMPLE_QUERY = {"prompt": "The capital of Veltria is", "completion": " Orvane", "top_k": 5}


class AttributeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_QUERY]})

    prompt: str = Field(..., min_length=1, description="Prompt, or the whole text when there is no completion.")
    completion: str | None = Field(None, description="Completion whose loss is attributed; omit to score the prompt.")
    top_k: int = Field(10, ge=1, description="Proponents and opponents to return (capped, see /v1/info).")
    include_text: bool = Field(True, description="Include each example's text.")

    def normalised(self) -> dict[str, Any]:
        """The cache-key form. Text is kept byte-exact: tokenisation depends on every character."""
        return {"prompt": self.prompt, "completion": self.completion or None, "top_k": self.top_k,
                "include_text": self.include_text}


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"queries": [
        EXAMPLE_QUERY, {"prompt": "The river that runs through Dunmarsh is", "completion": " Kell"}]}]})

    queries: list[AttributeRequest] = Field(..., min_length=1, description="Answered in order (capped).")


class ScoredExample(BaseModel):
    rank: int
    index: int = Field(..., description="Row of the example in the store's corpus.")
    id: str
    score: float = Field(..., description="Positive: proponent; negative: opponent.")
    text: str | None = None


class Diagnostics(BaseModel):
    nonzeros: int = Field(..., description="Examples with a nonzero Lasso weight.")
    iterations: int = Field(..., description="Coordinate-descent epochs of this query's Lasso solve.")
    gap: float = Field(..., description="Final duality gap relative to 1/2 ||y_c||^2.")
    converged: bool
    # solver-side extras, useful when a result looks odd
    model_config = ConfigDict(extra="allow")


class Timing(BaseModel):
    forward: float
    measure: float
    solve: float
    total: float


class ModelRef(BaseModel):
    path: str
    sha256: str


class StoreRef(BaseModel):
    version: str
    num_examples: int
    num_subsets: int


class AttributeResponse(BaseModel):
    request_id: str
    model: ModelRef
    store: StoreRef
    loss: float = Field(..., description="Mean next-token NLL of the completion (or of the whole text).")
    proponents: list[ScoredExample]
    opponents: list[ScoredExample]
    diagnostics: Diagnostics
    timing_ms: Timing = Field(..., description="Of the batch that computed the answer (cached: of the original).")
    cached: bool


class BatchResponse(BaseModel):
    request_id: str
    results: list[AttributeResponse]


class ExampleResponse(BaseModel):
    request_id: str
    index: int
    id: str
    text: str
    num_chars: int
    store_version: str


class InfoResponse(BaseModel):
    version: dict[str, str]
    model: ModelRef
    device: str
    store: dict[str, Any]
    solver: dict[str, Any]
    limits: dict[str, Any]
    cache: dict[str, Any]
    auth: bool


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)


class ProblemDoc(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
