"""The served model and what the API writes beside it: the hot-swapped model, the prediction log, feedback.

``ModelHolder`` keeps the registry's current version loaded and swaps it atomically (the old model
answers until the new one has loaded and passed its checks; a broken version is kept out).
``PredictionRecorder`` hands every answered request to the prediction log; ``FeedbackWriter`` stores
feedback in threads of its own with a bounded wait, so a slow database never stalls scoring.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from custseg.errors import FeedbackUnavailableError, ModelNotFoundError, RegistryUnavailableError
from custseg.redact import redact_text
from custseg.registry.client import ModelRef, load_scorer, resolve
from custseg.scoring.scorer import Scorer, Scores
from custseg.serving.metrics import ApiMetrics
from custseg.settings import Settings

logger = logging.getLogger(__name__)


FEEDBACK_RETRY_SECONDS = FeedbackUnavailableError.retry_after_seconds
REJECTED_RETRY_SECONDS = 60.0
"""A version that failed to load or check is tried again after this long (or 10 polls), not every poll."""


# -- the served model and its hot swap -----------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """What answers a request: a scorer and the registry entry it came from (swapped as one value)."""

    scorer: Scorer
    ref: ModelRef
    loaded_at: str
    summary: dict[str, str] = field(default_factory=dict)


class PredictionLog(Protocol):
    """What the API needs from a prediction log (see custseg.predlog)."""

    def start(self) -> None: ...
    def submit_scored(
        self,
        request_id: str,
        ts: float,
        model_name: str,
        model_version: str,
        records: Sequence[Any],
        labels: Any,
        probabilities: Any,
        classes: Sequence[str],
        latency_ms: float | None,
        *,
        client_request_id: str | None = None,
        reasons: Sequence[Any] | None = None,
    ) -> None: ...
    def close(self) -> None: ...


def load_api_scorer(settings: Settings, uri: str | None = None) -> tuple[Scorer, ModelRef]:
    """A version as the API serves it: verified, scored by the compiled kernel, and its explainer's
    signature tables built (`TreeExplainer.build_tables`, tens of ms and MB once per load) so that
    ``?explain=K`` costs one table read per tree (~40 us a row) instead of a pass over every leaf
    (~150 us)."""
    scorer, ref = load_scorer(settings, uri, compiled=True)
    if scorer.explainer is not None:
        scorer.explainer.build_tables()
    return scorer, ref


class ModelHolder:
    """Holds the served model and keeps it in step with the registry."""

    def __init__(self, settings: Settings, model_uri: str | None, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.model_uri = model_uri or settings.model_uri
        self.metrics = metrics
        self.current: LoadedModel | None = None
        self._rejected: dict[str, float] = {}  # version URI -> monotonic time of the next attempt
        self.registry_problem: str | None = None  # the last poll's RegistryUnavailableError, if any

    async def refresh(self) -> None:
        """Load the version the URI names now if it is not the one being served; never raises."""
        try:
            ref = await asyncio.to_thread(resolve, self.settings, self.model_uri)
        except ModelNotFoundError as exc:
            self.registry_problem = None
            if self.current is None:
                logger.info("no model to serve yet: %s", exc)
            else:
                logger.warning("%s; still serving version %s", exc, self.current.ref.version)
            return
        except Exception as exc:  # the registry may be briefly unreachable; try again next poll
            self.registry_problem = redact_text(str(exc))
            kept = f"still serving version {self.current.ref.version}" if self.current else "no model yet"
            logger.warning("%s (%s); %s", type(exc).__name__, self.registry_problem, kept)
            return
        self.registry_problem = None
        current = self.current
        if current is not None and current.ref.version == ref.version and current.ref.name == ref.name:
            return
        if time.monotonic() < self._rejected.get(ref.uri, 0.0):
            return  # refused recently: do not download and check it again on every poll
        try:
            scorer, loaded_ref = await asyncio.to_thread(load_api_scorer, self.settings, ref.uri)
        except RegistryUnavailableError as exc:  # not the version's fault: try again next poll
            self.registry_problem = str(exc)
            logger.warning("%s", exc)
            return
        except Exception as exc:  # a broken version must never replace a working one
            self.metrics.swap_failures.inc()
            wait = max(REJECTED_RETRY_SECONDS, 10 * self.settings.model_poll_seconds)
            self._rejected[ref.uri] = time.monotonic() + wait
            kept = f"still serving version {current.ref.version}" if current else "no model is serving"
            logger.error(
                "model %s failed to load or check (%s: %s); %s; next attempt in %.0f s",
                ref.uri,
                type(exc).__name__,
                redact_text(str(exc)),
                kept,
                wait,
            )
            return
        self._rejected.pop(ref.uri, None)
        self.install(scorer, loaded_ref)

    def install(self, scorer: Scorer, ref: ModelRef) -> None:
        previous = self.current
        loaded = LoadedModel(
            scorer=scorer,
            ref=ref,
            loaded_at=datetime.now(tz=UTC).isoformat(timespec="seconds"),
            summary={"name": ref.name, "version": ref.version},
        )
        self.current = loaded  # one reference assignment: requests see the old pair or the new one
        self.metrics.swaps.inc()
        self.metrics.model_loaded.set(1)
        if previous is not None:
            with suppress(KeyError):
                old = previous.ref
                # 0 first: with several workers the value stays in the shared files after remove()
                self.metrics.model_info.labels(old.name, old.version, previous.scorer.backend).set(0)
                self.metrics.model_info.remove(old.name, old.version, previous.scorer.backend)
        self.metrics.model_info.labels(ref.name, ref.version, scorer.backend).set(1)
        was = f"replacing version {previous.ref.version}" if previous else "first model"
        logger.info("serving %s version %s (%s backend; %s)", ref.name, ref.version, scorer.backend, was)

    async def poll_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.refresh()


class PredictionRecorder:
    """Hands each answered request to the prediction log as one compact tuple (its writer thread
    builds the rows); never blocks the request."""

    def __init__(self, log: PredictionLog) -> None:
        self.log = log
        self.with_client_ids = _accepts_keyword(log.submit_scored, "client_request_id")
        self.with_reasons = _accepts_keyword(log.submit_scored, "reasons")

    def record(
        self,
        records: list[Any],
        scores: Scores,
        loaded: LoadedModel,
        request_id: str,
        started: float | None,
        client_request_id: str | None,
        *,
        explanations: Sequence[Any] | None = None,
    ) -> None:
        """``explanations`` (one per record, when the request asked for reasons) are logged as the
        rows' ``reasons``; the log's writer thread formats them, not the request."""
        latency_ms = (time.perf_counter() - started) * 1000 if started else 0.0
        ref = loaded.ref
        extra: dict[str, Any] = (
            {"client_request_id": client_request_id} if client_request_id and self.with_client_ids else {}
        )
        if explanations is not None and self.with_reasons:
            extra["reasons"] = explanations
        self.log.submit_scored(
            request_id,
            time.time(),
            ref.name,
            ref.version,
            records,
            scores.labels,
            scores.probabilities,
            scores.classes,
            latency_ms,
            **extra,
        )


class FeedbackWriter:
    """Runs ``record_feedback`` in threads of its own with a bounded wait.

    Feedback waits on the database (a flush of the log, then a transaction); in the default thread
    pool, which batch scoring and registry polls share, a few stuck calls stalled scoring. Here at
    most ``threads`` calls run and as many wait; beyond that, or past ``timeout`` seconds, the client
    gets a 503 with Retry-After at once.
    """

    def __init__(self, record: Callable[..., Any], *, threads: int, timeout: float) -> None:
        self.record = record
        self.timeout = timeout
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="custseg-feedback")
        self.slots = threading.BoundedSemaphore(2 * threads)
        self.with_source = _accepts_keyword(record, "source")

    async def write(self, records: list[dict[str, Any]], source: str) -> Any:
        if not self.slots.acquire(blocking=False):
            raise FeedbackUnavailableError(
                "too many feedback writes are waiting for the prediction log; "
                f"retry in {FEEDBACK_RETRY_SECONDS} s"
            )
        kwargs = {"source": source} if self.with_source else {}
        try:
            future: Future[Any] = self.executor.submit(self.record, records, **kwargs)
        except RuntimeError:  # shutting down
            self.slots.release()
            raise
        future.add_done_callback(lambda _: self.slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            raise FeedbackUnavailableError(
                f"the prediction log did not confirm the feedback within {self.timeout:g} s; retry in "
                f"{FEEDBACK_RETRY_SECONDS} s (feedback stored meanwhile is reported as already recorded)"
            ) from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` takes the keyword ``name`` (logs written against an older interface do not)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
