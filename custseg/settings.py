"""All configuration in one pydantic-settings class (environment prefix ``CUSTSEG_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Read from the environment when constructed, never at import time."""

    # The docstring under each field is its description (`field_descriptions`, shown on the generated
    # configuration page). Not pydantic's use_attribute_docstrings: it re-reads this file on every import,
    # ~30 ms of every `custseg` command.
    model_config = SettingsConfigDict(env_prefix="CUSTSEG_", extra="ignore", populate_by_name=True)

    home: Path = Field(default=Path("~/.custseg"))
    """Folder for all local state: MLflow store, artifacts, prediction log."""

    tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "CUSTSEG_TRACKING_URI")
    )
    """MLflow tracking server; when unset, an embedded SQLite store under ``home`` is used."""

    model_name: str = "customer-segments"
    """Registered model name."""

    experiment_name: str = "customer-segments"
    """MLflow experiment that holds training and monitoring runs."""

    seed: int = 42
    """Random seed for splits, cross-validation and models."""

    cv_folds: int = 5
    """Stratified cross-validation folds on the training part (reduced to no fewer than 3)."""

    cv_repeats: int = Field(default=5, ge=1)
    """Repeats of the cross-validation split, each a fresh seeded shuffle: every candidate, and the quality
    gate's paired comparison, is scored on ``cv_repeats × cv_folds`` folds. Fewer repeats train faster and
    rank candidates less reliably on tiny classes."""

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted API keys, comma-separated; empty disables authentication (loopback only)."""

    max_batch_rows: int = 1000
    """Most rows one /predict request may score."""

    max_body_bytes: int = 1_048_576
    """Largest request body accepted, in bytes."""

    model_poll_seconds: float = 30.0
    """How often the API checks whether the champion alias moved (0 disables)."""

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origins allowed by CORS, comma-separated; none by default."""

    model_uri: str | None = None
    """Model the API serves (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``); the champion when unset."""

    metrics_open: bool = False
    """Serve ``/metrics`` without an API key even when keys are configured (a private-network scraper)."""

    prediction_log_url: str | None = None
    """SQLAlchemy URL of the prediction log; SQLite under ``home`` when unset."""

    prediction_log_enabled: bool = True
    """Record every answered prediction in the prediction log (the API's monitoring source)."""

    prediction_log_table_prefix: str = ""
    """Prefix for the log's table names, so several logs can share one database."""

    prediction_log_retention_days: float = 90.0
    """Predictions and feedback older than this are purged periodically (0 keeps everything)."""

    prediction_log_queue_rows: int = 100_000
    """Most rows held in memory waiting to be written; beyond it new rows are dropped and counted."""

    prediction_log_flush_seconds: float = 0.2
    """Longest time a row waits in memory before it is written (the loss window after a crash)."""

    prediction_log_batch_rows: int = 500
    """Rows written per database round trip; a full batch is written without waiting."""

    # -- prediction log: faults (timeouts, spool, bounded shutdown; issue 10) --------------------------

    prediction_log_statement_timeout_seconds: float = 5.0
    """Longest a prediction-log write may run (PostgreSQL ``statement_timeout``, SQLite busy timeout);
    the writer stops waiting for an answer one connect timeout later and spools the rows."""

    prediction_log_connect_timeout_seconds: float = 3.0
    """Longest a connection attempt to the prediction log's database may take."""

    prediction_log_retry_max_seconds: float = 5.0
    """Longest pause between tries while the database is unavailable (the pause doubles up to it)."""

    prediction_log_spool_max_bytes: int = 256 * 1024 * 1024
    """Most bytes of predictions kept in the local spool (under ``home``) while the database is down;
    beyond it new rows are dropped and counted."""

    prediction_log_close_seconds: float = 20.0
    """Longest the prediction log's shutdown waits for the database before spooling what is left."""

    monitor_performance_rows: int = 10_000
    """The API's realised-performance gauges use at most this many of the latest labelled predictions."""

    drift_p_value: float = 0.05
    """A feature's shift is statistically significant below this p-value."""

    drift_psi: float = 0.2
    """PSI at or above this is drift (when significant)."""

    drift_psi_warn: float = 0.1
    """PSI at or above this is a warning (when significant)."""

    drift_effect: float = 0.1
    """Material effect besides PSI: Wasserstein / reference std (numeric) or Jensen-Shannon distance."""

    drift_min_rows: int = 200
    """Windows with fewer rows are reported as too small to judge."""

    monitor_window_rows: int = 5000
    """The API's live drift gauges cover the last this many predictions."""

    monitor_refresh_seconds: float = 30.0
    """How often the API recomputes its live drift and realised-performance gauges (0 disables)."""

    # -- model bundles: verification and fallback (issue 10, verified bundles) -------------------

    allow_pipeline_fallback: bool = False
    """Serve a model with its scikit-learn pipeline (``pipeline.skops``) when it has no usable ONNX graph
    or compiled forest. Off: such a model is refused, whatever its ``bundle.json`` says."""

    allow_unverified_bundles: bool = False
    """Load model versions registered before custseg recorded bundle checksums (no
    ``custseg.bundle_sha256`` tag). Off: they are refused; register a new version instead."""

    # -- serving: key scopes, trusted hosts, workers, feedback (issue 10, HTTP side) --------------

    scoring_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """API keys allowed to score only (``/predict``, ``/score``, ``/model``), comma-separated."""

    feedback_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """API keys allowed to record true segments only (``/feedback``, ``/model``), comma-separated."""

    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """API keys for operators (``/metrics``, ``/model`` and admin actions), comma-separated."""

    trusted_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Host header values the API answers besides loopback names and the bind address (``*``: any)."""

    workers: int | None = Field(default=None, ge=1)
    """Worker processes of ``custseg serve``; the number of usable CPU cores when unset."""

    feedback_threads: int = Field(default=2, ge=1)
    """Threads that write feedback to the prediction log (apart from the threads that score)."""

    feedback_timeout_seconds: float = Field(default=5.0, gt=0)
    """Longest wait for the prediction log to store feedback before the API answers 503."""

    # -- segment snapshots and analytics (issue 13) -----------------------------------------------

    snapshots_uri: str | None = None
    """Folder (or ``file://`` URI; Spark also takes ``hdfs://``, ``s3a://``...) holding segment snapshots as
    ``date=YYYY-MM-DD/part-*.parquet``; ``<home>/snapshots`` when unset."""

    snapshot_experiment_name: str = "customer-segments-snapshots"
    """MLflow experiment where each recorded snapshot logs its segment counts and shares (a run per date)."""

    segment_share_shift: float = Field(default=0.05, gt=0, le=1)
    """Largest change in a segment's share between the last two snapshots that `custseg monitor` accepts;
    a bigger one is reported as a shift."""

    # -- explanations: importance monitoring (issue 12) -------------------------------------------

    importance_shift_threshold: float = Field(default=0.05, gt=0, le=1)
    """`custseg monitor` flags a feature whose share of the total importance (mean |contribution| to the
    predicted segment, exact Tree SHAP) moved by at least this much between the training reference and
    the current window (0.05 = five percentage points)."""

    # -- web app: the Upload page (issue 14) ------------------------------------------------------

    ui_upload_max_mb: int = Field(default=200, ge=1)
    """Largest file the web app's Upload page accepts, in MiB (streamed to ``<home>/uploads``, never held
    in memory; a bigger one is refused with 413). Uploads are exempt from ``max_body_bytes``."""

    ui_upload_ttl_minutes: float = Field(default=60.0, gt=0)
    """How long the Upload page keeps a scored file and its rejects for download, in minutes; then they
    are deleted."""

    @field_validator(
        "api_keys",
        "cors_origins",
        "scoring_keys",
        "feedback_keys",
        "admin_keys",
        "trusted_hosts",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("tracking_uri", "prediction_log_url", "snapshots_uri", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def embedded_tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def effective_tracking_uri(self) -> str:
        return self.tracking_uri or self.embedded_tracking_uri

    @property
    def effective_prediction_log_url(self) -> str:
        return self.prediction_log_url or f"sqlite:///{self.home / 'predictions.db'}"


def field_descriptions() -> dict[str, str]:
    """Each `Settings` field's description: the docstring under it, read from this module's source as
    pydantic's ``use_attribute_docstrings`` would (cleaned by :func:`inspect.cleandoc`), but only when
    asked (the generated configuration page, its test), not on every import."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(Settings)).body[0]
    assert isinstance(body, ast.ClassDef)
    found: dict[str, str] = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[node.target.id] = inspect.cleandoc(after.value.value)
    return found
