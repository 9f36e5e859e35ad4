"""Logs that say which payment and which workflow every line is about.

Each record gets ``payment_id`` and ``workflow_id``: from the Temporal SDK's workflow or
activity context when the line comes from a workflow or an activity, otherwise from the
request being served (the checkout API and the webhook receiver set it). ``text`` format
is for people; ``json`` is one object per line for a log pipeline.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import re
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


_EMAIL = re.compile(r"(?<![\w.+-])([A-Za-z0-9])[A-Za-z0-9._%+-]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w.+-])(?:"
    r"\+\d{7,15}"  # E.164 without separators
    r"|(?<!\d)1[3-9]\d{9}"  # a mobile number in China
    r"|(?!\d{4}-\d{2}-\d{2})(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}"  # grouped
    r")(?![\w.-]*\d)"
)


def _keep(address: str) -> bool:
    """Loopback and unspecified addresses are the service's own, not a person's."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True  # not an address after all (a time, a hash)
    return ip.is_loopback or ip.is_unspecified


def _mask_phone(match: re.Match) -> str:
    text = match.group(0)
    digits = [c for c in text if c.isdigit()]
    if len(digits) < 7 or len(digits) > 15:
        return text  # too short or too long for a phone number (an amount, an id)
    return "***" + "".join(digits[-2:])


def mask(text: str) -> str:
    """E-mail, IP addresses and phone numbers masked: ``li@example.com`` -> ``l***@example.com``."""
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)
    text = _IPV6.sub(lambda m: m.group(0) if _keep(m.group(0)) else "****:****", text)
    text = _IPV4.sub(lambda m: m.group(0) if _keep(m.group(0)) else "***.***.***.***", text)
    return _PHONE.sub(_mask_phone, text)


class MaskingFilter(logging.Filter):
    """Personal data out of log lines: the message (with its arguments) and any exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "payment_id": None if record.__dict__.get("payment_id", "-") == "-" else record.__dict__["payment_id"],
            "workflow_id": None if record.__dict__.get("workflow_id", "-") == "-" else record.__dict__["workflow_id"],
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str = "text", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(MaskingFilter())
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
