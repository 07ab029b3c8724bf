"""WebSocket transport (``/v1/ws``): being written."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
