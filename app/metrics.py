"""Prometheus metrics, on a registry of their own so several apps in one process (tests) coexist."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("stride_http_requests_total", "HTTP requests by route template and status.",
                   ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("stride_http_request_duration_seconds", "HTTP request latency by route template.",
                    ["method", "route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CACHE = Counter("stride_cache_requests_total", "Result-cache lookups: hit, miss, error, skipped (breaker open).",
                ["result"], registry=REGISTRY)
CACHE_WRITES = Counter("stride_cache_writes_total", "Result-cache writes: ok or error.", ["result"],
                       registry=REGISTRY)
BREAKER_OPEN = Gauge("stride_cache_breaker_open", "1 while the Redis circuit breaker skips Redis.",
                     registry=REGISTRY)
SINGLE_FLIGHT = Counter("stride_single_flight_joined_total",
                        "Requests answered by joining an identical in-flight computation.", registry=REGISTRY)
BATCH_SIZE = Histogram("stride_batch_size", "Queries per forward pass and solve.", registry=REGISTRY,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_SECONDS = Histogram("stride_batch_duration_seconds", "Model work per batch (forward + measure + solve).",
                          registry=REGISTRY, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SOLVER_ITERATIONS = Histogram("stride_solver_iterations", "Coordinate-descent epochs of each query's Lasso solve.",
                              registry=REGISTRY, buckets=(10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000))
QUEUE_DEPTH = Gauge("stride_queue_depth", "Queries waiting for a batch.", registry=REGISTRY)
REJECTED = Counter("stride_rejected_total", "Queries and requests refused: door (at admission, before the body is "
                   "read: backlog and admitted work over the limit), queue_full, shed (at the queue: predicted wait "
                   "over the limit), expired (dropped before computing), deadline (no answer in time), inflight "
                   "(requests).",
                   ["reason"], registry=REGISTRY)
READY = Gauge("stride_ready", "1 once the model and store are loaded and warmed up.", registry=REGISTRY)
STORE_RELOADS = Counter("stride_store_reloads_total", "Hot reloads of the store: ok, unchanged (same version), "
                        "refused (failed verification or warm-up; the previous store kept serving).", ["result"],
                        registry=REGISTRY)
