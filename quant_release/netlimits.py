"""Time limits and retries for every network client the run uses: the Hub (huggingface_hub's httpx
client, which `datasets` shares), S3 (boto3) and MLflow.

Without them an endpoint that accepts connections and never answers hangs the run silently
(huggingface_hub's default client has no timeout at all). Limits come from `Settings`
(QUANT_RELEASE_NET_CONNECT_TIMEOUT, QUANT_RELEASE_NET_READ_TIMEOUT, QUANT_RELEASE_NET_RETRIES).

Retried, with exponential backoff: connection refused/reset and 429 always (the server did not act on
the request), 5xx only for idempotent requests whose body can be sent again. Never retried: 401, 403,
404 and other 4xx (asking again cannot help), and read timeouts (a hung server would multiply the wait).

MLflow is the exception to the retry count: its calls are small, are made all through a run, and a tracking
server restarting under a long run must not fail it. Its client (urllib3 underneath) retries every method,
with backoff 2 s doubling, as many times as it takes for the waits to span QUANT_RELEASE_NET_MLFLOW_OUTAGE
(60 s: 5 retries; preflight has already checked the server answers, with a single probe). urllib3 also retries
MLflow's read timeouts, so a tracking server that hangs mid-run costs (1 + retries) read timeouts.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx
    from botocore.config import Config

    from quant_release.config import Settings

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MLFLOW_BACKOFF_FACTOR = 2  # urllib3: no wait before the first retry, then 2 * 2**(n - 1) s before the n-th
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_WAIT_S = 8.0


@dataclass(frozen=True)
class NetLimits:
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5  # first wait; doubled per retry, capped at MAX_WAIT_S
    mlflow_outage: float = 60.0  # seconds of MLflow server outage that its client's retries span

    @classmethod
    def from_settings(cls, settings: Settings) -> NetLimits:
        return cls(
            settings.net_connect_timeout,
            settings.net_read_timeout,
            settings.net_retries,
            mlflow_outage=settings.net_mlflow_outage,
        )

    @property
    def mlflow_retries(self) -> int:
        """The fewest retries whose backoff waits add up to `mlflow_outage`: MLFLOW_BACKOFF_FACTOR * (2**n - 2)."""
        retries = 0
        while MLFLOW_BACKOFF_FACTOR * (2**retries - 2) < self.mlflow_outage:
            retries += 1
        return max(retries, self.retries)

    def wait(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), MAX_WAIT_S)
        return min(self.backoff * 2.0**attempt, MAX_WAIT_S)


_CURRENT: list[NetLimits] = [NetLimits()]  # one per process, replaced by `install`


def current() -> NetLimits:
    return _CURRENT[0]


def s3_config(max_pool_connections: int) -> Config:
    from botocore.config import Config

    limits = current()
    # botocore's "standard" mode retries throttling, 5xx and connection errors, not 4xx.
    return Config(
        retries={"mode": "standard", "total_max_attempts": 1 + limits.retries},
        connect_timeout=limits.connect_timeout,
        read_timeout=limits.read_timeout,
        max_pool_connections=max_pool_connections,
    )


# Inside `single_attempt()` requests are not retried (see there).
_SINGLE_ATTEMPT: ContextVar[bool] = ContextVar("quant_release_single_attempt", default=False)


@contextlib.contextmanager
def single_attempt() -> Iterator[None]:
    """Probes ("is the Hub there?", while resolving `--calib-dataset auto`) answer from one attempt:
    retrying an endpoint that is simply absent only delays the fallback (measured: +6 s on every
    offline run's preflight)."""
    token = _SINGLE_ATTEMPT.set(True)
    try:
        yield
    finally:
        _SINGLE_ATTEMPT.reset(token)


def _retry_transport(inner: httpx.BaseTransport, limits: NetLimits) -> httpx.BaseTransport:
    import httpx

    class RetryTransport(httpx.BaseTransport):
        def __init__(self, inner: httpx.BaseTransport, limits: NetLimits) -> None:
            self.inner = inner
            self.limits = limits

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            # huggingface_hub passes `timeout=None` per request (model_info, ...), which httpx reads as
            # "no limit" and which overrides the client's default: fill every unset limit with ours.
            timeout = dict(request.extensions.get("timeout") or {})
            for phase, limit in (
                ("connect", self.limits.connect_timeout),
                ("read", self.limits.read_timeout),
                ("write", self.limits.read_timeout),
                ("pool", self.limits.connect_timeout),
            ):
                if timeout.get(phase) is None:
                    timeout[phase] = limit
            request.extensions["timeout"] = timeout
            # A body other than bytes (a file being streamed) cannot be sent twice.
            replayable = isinstance(request.stream, httpx.ByteStream)
            retries = 0 if _SINGLE_ATTEMPT.get() else self.limits.retries
            attempt = 0
            while True:
                try:
                    response = self.inner.handle_request(request)
                except httpx.ConnectError:
                    # Never reached the server: safe to send again whatever the method.
                    if attempt >= retries or not replayable:
                        raise
                    retry_after = None
                except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                    # Reset mid-exchange: the server may have acted; only idempotent requests go again.
                    if attempt >= retries or not replayable or request.method not in IDEMPOTENT:
                        raise
                    retry_after = None
                else:
                    status = response.status_code
                    retry = status == 429 or (status in RETRY_STATUS and request.method in IDEMPOTENT)
                    if not retry or attempt >= retries or not replayable:
                        return response
                    retry_after = response.headers.get("retry-after")
                    response.close()
                time.sleep(self.limits.wait(attempt, retry_after))
                attempt += 1

        def close(self) -> None:
            self.inner.close()

    return RetryTransport(inner, limits)


def hub_client(limits: NetLimits) -> httpx.Client:
    """The client huggingface_hub would make (its request hook, redirects), with limits and retries."""
    import httpx
    from huggingface_hub.utils._http import hf_request_event_hook

    transport = _retry_transport(httpx.HTTPTransport(), limits)
    return httpx.Client(
        event_hooks={"request": [hf_request_event_hook]},
        follow_redirects=True,
        timeout=httpx.Timeout(limits.read_timeout, connect=limits.connect_timeout),
        transport=transport,
    )


def mlflow_retries_spent() -> None:
    """One MLflow call has waited out the whole outage window in vain: the calls that follow (the cleanup that
    records the failure: stage run end, summary, parent run end) try once each instead of each waiting the
    window again, so a run whose server is gone fails after one window, not one per call."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


def install(settings: Settings) -> NetLimits:
    """Apply the limits to every client of this process. Called by the CLI and the Prefect flow before
    a run (not on import: a test's own Hub client factory must stay in place)."""
    limits = NetLimits.from_settings(settings)
    _CURRENT[0] = limits
    # MLflow reads these per request; an explicit MLFLOW_HTTP_* setting wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(limits.read_timeout))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(limits.mlflow_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(MLFLOW_BACKOFF_FACTOR))
    from huggingface_hub.utils._http import set_client_factory

    set_client_factory(lambda: hub_client(limits))
    return limits
