"""The running agent's parts, held by the app (one instance, no module globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from agent.audit import AuditLog
from agent.authz import PolicyStore
from agent.metrics import Metrics
from agent.models import ModelResolver
from agent.runtime.lifecycle import ModelManager
from agent.settings import Settings
from agent.tokens import TokenStore
from registry.service import Registry


@dataclass
class AgentState:
    settings: Settings
    registry: Registry
    manager: ModelManager
    metrics: Metrics
    resolver: ModelResolver
    audit: AuditLog
    policy: PolicyStore
    tokens: TokenStore
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    stopping: bool = False
    closed: bool = False


STATE = web.AppKey("state", AgentState)
