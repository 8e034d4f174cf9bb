"""HTTP bodies, derived from the library's one contract (``stride.result``): a request is a
``Query`` plus paging fields; answers are ``stride.result.Answer`` & co. themselves, which
``stride.client`` parses too. The examples feed the OpenAPI page at ``/docs`` and are real demo
facts (``app/examples.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from app.examples import EXAMPLE_QUERIES
from stride.result import Answer, BatchAnswer, ExampleAnswer, ModelRef, Query

# the answers are the library's own types, under the names the routes use
AttributeResponse, BatchResponse, ExampleResponse = Answer, BatchAnswer, ExampleAnswer


class AttributeRequest(Query):
    """Strict types: ``true`` is no ``top_k`` and ``"yes"`` no ``include_text``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": EXAMPLE_QUERIES})

    top_k: StrictInt = Field(10, ge=1, description="Proponents and opponents to return (capped, see /v1/info).")
    include_text: StrictBool = Field(True, description="Include each example's text.")

    def query(self) -> Query:
        return Query.model_construct(**{k: getattr(self, k) for k in Query.model_fields})

    def normalised(self) -> dict[str, Any]:
        """The cache-key form. Text is kept byte-exact: tokenisation depends on every character."""
        return self.model_dump(exclude_none=True)

    def chars(self) -> int:
        """Characters of text in the query (logged instead of the text itself)."""
        return len(self.prompt or "") + len(self.completion or "") + sum(len(m.content) for m in self.messages or [])


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"queries": EXAMPLE_QUERIES[:2]}]})

    queries: list[AttributeRequest] = Field(..., min_length=1, description="Answered in order (capped).")


class InfoResponse(BaseModel):
    version: dict[str, str]
    model: ModelRef
    device: str
    store: dict[str, Any] = Field(..., description="Version, shapes, fit mode, layer, max_length (as built) and "
                                  "window (tokens a query may have: max_length capped by the model's positions).")
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
