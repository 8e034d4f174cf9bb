"""The one query and result contract: what a query may say, what an answer holds, what can go wrong.

Defined once, here, as pydantic models: ``Attributor`` returns them, the HTTP schemas derive from
them (``app/schemas.py``), the CLI prints them and the client (``stride.client``) parses answers
back into them. pydantic only validates data; nothing here imports a web or CLI library.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

TokenId = Annotated[StrictInt, Field(ge=0)]
Offset = Annotated[StrictInt, Field(ge=0)]


class QueryError(ValueError):
    """A query that cannot be answered as given (the message says why). Only this family is the
    caller's fault: the service maps it to 4xx and the batcher answers the rest of a batch without it."""


class UnscorableQuery(QueryError):
    """No token to score: a one-token text without a completion, or a span over nothing."""


class InvalidQuery(QueryError):
    """The query names something the model does not have: a token id past the vocabulary, a chat
    conversation for a tokenizer without a chat template, a span outside the completion."""


class QueryTooLong(QueryError):
    """The tokens to score do not fit the model's window (the HTTP service answers 413)."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(..., min_length=1, description="system, user, assistant, ... as the chat template knows them.")
    content: str


class Query(BaseModel):
    """One output to attribute, in exactly one of three forms.

    - text: ``prompt`` and ``completion``; without a completion the whole prompt is scored (it then
      needs two tokens at least: the first has no context to be predicted from);
    - chat: ``messages``, whose last (assistant) message is the completion, rendered with the model's
      own chat template;
    - token ids: ``prompt_ids`` and ``completion_ids``, exactly what a serving engine generated.

    ``span`` = [start, end) restricts the scored tokens to those overlapping it: character offsets
    into the completion (the prompt when there is none, the last message's content for chat), token
    offsets into ``completion_ids`` for id queries.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="Prompt, or the whole scored text when there is no completion "
                               "(it then needs two tokens at least: the first has no context to be predicted from).")
    completion: str | None = Field(None, min_length=1, description="Completion whose loss is attributed; omit "
                                   "to score the prompt.")
    messages: list[Message] | None = Field(None, min_length=1, description="Chat conversation; the last "
                                           "message must be the assistant's: it is the completion.")
    prompt_ids: list[TokenId] | None = Field(None, description="Prompt token ids (no special token is added).")
    completion_ids: list[TokenId] | None = Field(None, min_length=1, description="Completion token ids.")
    span: tuple[Offset, Offset] | None = Field(None, description="[start, end): score only the completion "
                                               "tokens overlapping it (characters; tokens for id queries).")

    def __init__(self, prompt: str | None = None, completion: str | None = None, /, **data: Any):
        """``Query(prompt, completion)`` positionally, as the benchmark scripts call it."""
        if prompt is not None:
            data["prompt"] = prompt
        if completion is not None:
            data["completion"] = completion
        super().__init__(**data)

    @model_validator(mode="after")
    def _one_form(self) -> Query:
        forms = [name for name, given in (
            ("prompt/completion", self.prompt is not None or self.completion is not None),
            ("messages", self.messages is not None),
            ("prompt_ids/completion_ids", self.prompt_ids is not None or self.completion_ids is not None),
        ) if given]
        if len(forms) != 1:
            raise ValueError("give exactly one of prompt/completion, messages or prompt_ids/completion_ids"
                             + (f", not {' and '.join(forms)}" if forms else ""))
        if self.completion is not None and self.prompt is None:
            raise ValueError("a completion needs a prompt (\"\" scores the completion alone)")
        if self.prompt == "" and self.completion is None:
            raise ValueError("the prompt is empty and there is no completion: nothing to score")
        if self.prompt_ids is not None and self.completion_ids is None and len(self.prompt_ids) < 2:
            raise ValueError("prompt_ids without completion_ids needs two tokens at least")
        if self.completion_ids is not None and self.prompt_ids is None:
            self.prompt_ids = []
        if self.messages is not None and self.messages[-1].role != "assistant":
            raise ValueError(f"the last message is the completion to attribute, so it must be the assistant's, "
                             f"not {self.messages[-1].role!r}")
        texts = [self.prompt, self.completion, *(m.content for m in self.messages or [])]
        for text in texts:
            if text is not None and not _encodable(text):
                raise ValueError("the text is not valid Unicode (it holds a lone surrogate, e.g. \\ud800)")
        if self.span is not None and self.span[0] >= self.span[1]:
            raise ValueError(f"span [{self.span[0]}, {self.span[1]}) is empty: start must be below end")
        return self


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Keyed:
    """``d["gap"]`` and ``**d`` reads, which the benchmark scripts use on diagnostics and timings."""

    def __getitem__(self, key: str) -> Any:
        fields = type(self).model_fields  # type: ignore[attr-defined]
        name = next((n for n, f in fields.items() if n == key or f.alias == key), None)
        if name is None:
            raise KeyError(key)
        return getattr(self, name)

    def keys(self) -> list[str]:
        return [f.alias or n for n, f in type(self).model_fields.items()]  # type: ignore[attr-defined]


class Diagnostics(_Keyed, BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    nonzeros: int = Field(..., description="Examples with a nonzero Lasso weight.")
    iterations: int = Field(..., description="Coordinate-descent epochs of this query's Lasso solve.")
    gap: float = Field(..., description="Final duality gap relative to 1/2 ||y_c||^2.")
    converged: bool = Field(..., description="The gap is within the solver's tolerance (certified).")
    lambda_: float = Field(..., alias="lambda", description="The Lasso penalty used (lam_ratio x lambda_max).")
    intercept: float = Field(..., description="The fitted intercept of the measurements.")


class Timing(_Keyed, BaseModel):
    """Milliseconds, of the whole batch the query was computed in."""

    forward: float
    measure: float
    solve: float
    total: float


class Scored(BaseModel):
    rank: int
    index: int = Field(..., description="Row of the example in the store's corpus.")
    id: str
    score: float = Field(..., description="Positive: proponent (lowered the loss); negative: opponent.")
    text: str | None = None


class TokenLoss(BaseModel):
    id: int
    text: str = Field(..., description="The token decoded alone.")
    loss: float = Field(..., description="Its next-token NLL under the deployed model.")
    scored: bool = Field(..., description="Inside the span: counted in the loss that is attributed.")


class QueryWarning(BaseModel):
    code: str = Field(..., description="'truncated', 'unknown-tokens', ...: stable, for clients to branch on.")
    detail: str


class Attribution(BaseModel):
    loss: float = Field(..., description="Mean next-token NLL of the scored tokens.")
    proponents: list[Scored]
    opponents: list[Scored]
    diagnostics: Diagnostics
    timing_ms: Timing
    tokens: list[TokenLoss] = Field(default_factory=list, description="Each completion token (the whole "
                                    "text's, bar the first, without a completion) with its loss.")
    scored_text: str = Field("", description="The scored tokens decoded: what the span selected.")
    warnings: list[QueryWarning] = Field(default_factory=list, description="Soft problems: the answer stands, "
                                         "but read it knowing these.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


class Example(BaseModel):
    index: int
    id: str
    text: str


# --- what the HTTP service answers (the server and stride.client share these) -------------------


class ModelRef(BaseModel):
    name: str = Field(..., description="The model directory's name (never the server's filesystem path).")
    sha256: str = Field(..., description="Digest of its weight files: what identifies the model.")


class StoreRef(BaseModel):
    version: str
    num_examples: int
    num_subsets: int


class Answer(Attribution):
    """An ``Attribution`` as the service sends it: which request, model and store, and whether cached."""

    request_id: str
    model: ModelRef
    store: StoreRef
    cached: bool = Field(..., description="From the result cache; timings are then the original computation's.")


class BatchAnswer(BaseModel):
    request_id: str
    results: list[Answer]


class ExampleAnswer(Example):
    request_id: str
    num_chars: int
    store_version: str
