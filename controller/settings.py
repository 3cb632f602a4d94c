"""Controller settings: pydantic-settings with the `EDGE_CONTROLLER_` environment prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ControllerSettings(BaseSettings):
    """Where the controller keeps its keys and state, and how it reaches the broker."""

    model_config = SettingsConfigDict(env_prefix="EDGE_CONTROLLER_", extra="forbid")

    home: Path = Field(default=Path("/var/lib/edge-agent-controller"),
                       description="Keys (fleet CA, signing key) and, by default, the database.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL, e.g. postgresql+psycopg://u@h/db; "
        "default: sqlite:///<home>/controller.db")
    broker_host: str = Field(default="localhost", description="MQTT broker host.")
    broker_port: int = Field(default=8883, ge=1, le=65535, description="Broker TLS port.")
    topic_prefix: str = Field(default="edge/v1", description="As the devices' sync.topic_prefix.")
    group: str = Field(default="ingest", description="Shared-subscription group of the workers.")
    client_cert: Path | None = Field(default=None, description="Controller client certificate; "
                                     "default <home>/controller.pem (+ .key).")
    session_expiry_seconds: float = Field(
        default=0.0, ge=0, le=7 * 86400, description="How long the broker keeps a stopped "
        "worker's session (and queues its share of the messages) for it to come back; 0: no "
        "session, a worker that is gone holds nothing (devices resend what no worker "
        "confirmed).")
    batch_commit: int = Field(
        default=200, ge=1, description="Most messages stored in one database transaction "
        "(fewer when no more are waiting); acknowledged only after it commits.")

    artifact_url: str | None = Field(
        default=None, description="Base https:// URL of `artifacts serve` as devices reach it "
        "(e.g. https://controller.example:8443); deployments name each file under it.")
    artifact_dir: Path | None = Field(default=None, description="Where `artifacts add` keeps "
                                      "model files; default <home>/artifacts.")

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'controller.db'}"

    @property
    def cert_files(self) -> tuple[Path, Path]:
        cert = self.client_cert or self.home / "controller.pem"
        return cert, cert.with_suffix(".key")
