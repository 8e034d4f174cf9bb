"""A Python client for the STRIDE service: ``Client(base_url, api_key=None).attribute(prompt, completion)``.

Sync (``Client``) and async (``AsyncClient``) over httpx, the only module of the package that
imports an HTTP library (``pip install stride-tda[client]``). Answers are parsed into the same
pydantic models the server sends (``stride.result.Answer`` ...). A 503 (queue full, not ready yet)
and a refused connection are retried with exponential backoff, honouring ``Retry-After``;
``attribute_batch`` splits a long list over the server's ``max_batch_queries``.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

import httpx

from stride.result import Answer, BatchAnswer, ExampleAnswer, Query

RETRY_STATUS = 503


class ApiError(Exception):
    """A problem document (RFC 9457) the service answered with: ``status``, ``type``, ``detail``."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status, self.problem = status, problem
        self.type = str(problem.get("type", ""))
        self.detail = str(problem.get("detail", ""))
        super().__init__(f"{status} {self.type}: {self.detail}")


def _example_path(example_id: str | int) -> str:
    return "/v1/examples/" + urllib.parse.quote(str(example_id), safe="")


class _Base:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout)
        self._max_batch: int | None = None

    def _delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry ``attempt + 1``, or None to stop: the server's Retry-After when
        it gives one, else exponential backoff; either times a random 1-1.5, since Retry-After is a
        floor and clients refused together must not come back together (measured with 512 clients
        retrying in step: waves of refusals took the server's event loop and halved its answer rate)."""
        if attempt >= self.retries or (response is not None and response.status_code != RETRY_STATUS):
            return None
        given = response.headers.get("retry-after") if response is not None else None
        if given is not None and given.strip().isdigit():
            return min(float(given) * self.jitter(), self.max_backoff)
        return min(self.backoff * 2**attempt * self.jitter(), self.max_backoff)

    @staticmethod
    def jitter() -> float:
        return random.uniform(1.0, 1.5)

    @staticmethod
    def _body(query: Query | dict[str, Any], top_k: int, include_text: bool) -> dict[str, Any]:
        q = query if isinstance(query, Query) else Query.model_validate(query)  # checked before it is sent
        return {**q.model_dump(mode="json", exclude_none=True), "top_k": top_k, "include_text": include_text}

    @staticmethod
    def _query(prompt: str | Query | None, completion: str | None, fields: dict[str, Any]) -> Query:
        return prompt if isinstance(prompt, Query) else Query(prompt, completion, **fields)

    @staticmethod
    def _parse(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:  # not JSON: a proxy's page, say
                problem = {"detail": response.text[:500]}
            raise ApiError(response.status_code, problem if isinstance(problem, dict) else {"detail": str(problem)})
        return response.json()

    def _chunks(self, queries: Sequence[Query | dict[str, Any]], size: int) -> Iterable[list]:
        for s in range(0, len(queries), size):
            yield list(queries[s : s + size])


class Client(_Base):
    """Synchronous client; use it as a context manager or call ``close()``."""

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any):
        super().__init__(base_url, api_key, **options)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                response: httpx.Response | None = self._http.request(method, path, json=body)
            except httpx.ConnectError:  # nothing was sent: safe to retry
                response = None
                if attempt >= self.retries:
                    raise
            delay = self._delay(attempt, response)
            if delay is None:
                return self._parse(response)  # type: ignore[arg-type]
            time.sleep(delay)
            attempt += 1

    def attribute(self, prompt: str | Query | None = None, completion: str | None = None, *, top_k: int = 10,
                  include_text: bool = True, **query: Any) -> Answer:
        """One query: ``attribute(prompt, completion)``, ``attribute(messages=[...])``,
        ``attribute(prompt_ids=[...], completion_ids=[...])``, any of them with ``span=(start, end)``."""
        body = self._body(self._query(prompt, completion, query), top_k, include_text)
        return Answer.model_validate(self._request("POST", "/v1/attribute", body))

    def attribute_batch(self, queries: Sequence[Query | dict[str, Any]], *, top_k: int = 10,
                        include_text: bool = True) -> list[Answer]:
        """Many queries, in order, in as few requests as the server's ``max_batch_queries`` allows."""
        out: list[Answer] = []
        for chunk in self._chunks(queries, self.max_batch_queries()):
            body = {"queries": [self._body(q, top_k, include_text) for q in chunk]}
            out += BatchAnswer.model_validate(self._request("POST", "/v1/attribute/batch", body)).results
        return out

    def max_batch_queries(self) -> int:
        if self._max_batch is None:
            self._max_batch = int(self.info()["limits"]["max_batch_queries"])
        return self._max_batch

    def example(self, example_id: str | int) -> ExampleAnswer:
        return ExampleAnswer.model_validate(self._request("GET", _example_path(example_id)))

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/info")

    def ready(self) -> bool:
        """One /readyz call, no retry."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncClient(_Base):
    """The same API, awaitable; use ``async with`` or ``await aclose()``."""

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any):
        super().__init__(base_url, api_key, **options)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                response: httpx.Response | None = await self._http.request(method, path, json=body)
            except httpx.ConnectError:
                response = None
                if attempt >= self.retries:
                    raise
            delay = self._delay(attempt, response)
            if delay is None:
                return self._parse(response)  # type: ignore[arg-type]
            await asyncio.sleep(delay)
            attempt += 1

    async def attribute(self, prompt: str | Query | None = None, completion: str | None = None, *, top_k: int = 10,
                        include_text: bool = True, **query: Any) -> Answer:
        body = self._body(self._query(prompt, completion, query), top_k, include_text)
        return Answer.model_validate(await self._request("POST", "/v1/attribute", body))

    async def attribute_batch(self, queries: Sequence[Query | dict[str, Any]], *, top_k: int = 10,
                              include_text: bool = True) -> list[Answer]:
        """The chunks are sent concurrently; the server micro-batches them with everything else in flight."""
        size = await self.max_batch_queries()
        bodies = [{"queries": [self._body(q, top_k, include_text) for q in c]} for c in self._chunks(queries, size)]
        answers = await asyncio.gather(*(self._request("POST", "/v1/attribute/batch", b) for b in bodies))
        return [r for a in answers for r in BatchAnswer.model_validate(a).results]

    async def max_batch_queries(self) -> int:
        if self._max_batch is None:
            self._max_batch = int((await self.info())["limits"]["max_batch_queries"])
        return self._max_batch

    async def example(self, example_id: str | int) -> ExampleAnswer:
        return ExampleAnswer.model_validate(await self._request("GET", _example_path(example_id)))

    async def info(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/info")

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
