"""The running agent's parts, held by the app (one instance, no module globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from agent.metrics import Metrics
from agent.runtime.autobench import AutoBench
from agent.runtime.resolver import ModelResolver
from agent.runtime.scheduler import Scheduler
from agent.security.audit import AuditLog
from agent.security.service import Security
from agent.settings import Settings
from agent.sync.service import SyncService
from localdb import Database
from registry.service import Registry


@dataclass
class AgentState:
    settings: Settings
    db: Database
    registry: Registry
    scheduler: Scheduler
    metrics: Metrics
    resolver: ModelResolver
    security: Security
    audit: AuditLog
    sync: SyncService
    autobench: AutoBench
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    stopping: bool = False
    closed: bool = False


STATE = web.AppKey("state", AgentState)
