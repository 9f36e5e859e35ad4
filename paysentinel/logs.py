"""Logs that say which payment and which workflow every line is about.

Each record gets ``payment_id`` and ``workflow_id``: from the Temporal SDK's workflow or
activity context when the line comes from a workflow or an activity, otherwise from the
request being served (the checkout API and the webhook receiver set it). ``text`` format
is for people; ``json`` is one object per line for a log pipeline.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Optional

payment_var: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("payment_id", default=None)
workflow_var: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("workflow_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [payment=%(payment_id)s workflow=%(workflow_id)s] %(message)s"


def payment_of(workflow_id: Optional[str]) -> Optional[str]:
    """The payment a workflow belongs to: payment-<order>, or its -refund-/-review- children."""
    if not workflow_id or not workflow_id.startswith("payment-"):
        return None
    for marker in ("-refund-", "-review-"):
        if marker in workflow_id:
            return workflow_id.rsplit(marker, 1)[0]
    return workflow_id


def bind(payment_id: Optional[str]) -> None:
    """Tag the lines logged while serving this request with the payment (and its workflow)."""
    payment_var.set(payment_id)
    workflow_var.set(payment_id)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        temporal = getattr(record, "temporal_activity", None) or getattr(record, "temporal_workflow", None)
        workflow_id = temporal.get("workflow_id") if isinstance(temporal, dict) else None
        workflow_id = workflow_id or workflow_var.get()
        record.workflow_id = workflow_id or "-"
        record.payment_id = payment_of(workflow_id) or payment_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "payment_id": None if record.payment_id == "-" else record.payment_id,
            "workflow_id": None if record.workflow_id == "-" else record.workflow_id,
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str = "text", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "alembic", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Workflow lines repeat the history (read it in the Web UI); shown with --verbose.
    logging.getLogger("temporalio.workflow").setLevel(logging.DEBUG if verbose else logging.WARNING)
    from temporalio import activity, workflow

    # The ids are fields of every line already; keep messages short.
    activity.logger.activity_info_on_message = False
    workflow.logger.workflow_info_on_message = False
