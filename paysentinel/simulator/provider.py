"""The simulated provider's state: trades, scripts, the calls it received, its books per order,
and the signed callbacks it sends (resent with backoff until acknowledged)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import Counter
from collections.abc import Coroutine
from datetime import date
from decimal import Decimal
from typing import Any, Optional
from zoneinfo import ZoneInfo

import httpx
from fastapi.responses import JSONResponse

from paysentinel import signing
from paysentinel.config import Settings
from paysentinel.simulator.bills import DayBill
from paysentinel.simulator.trades import OPERATIONS, Operation, Script, SimRefund, SimTrade, _error, _now, new_trade_no

log = logging.getLogger("paysentinel.simulator")


class Provider:
    """The simulated provider's books: trades, scripts, calls received, callbacks sent."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.trades: dict[str, SimTrade] = {}
        self.orders_by_trade_no: dict[str, str] = {}
        self.scripts: dict[str, Script] = {}
        self.faults_left: dict[str, dict[str, int]] = {}
        self.calls: dict[str, Counter[str]] = {}
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.extra_trades: dict[str, list[SimTrade]] = {}  # second charges of an order
        self.refund_failures_left: dict[str, int] = {}
        self.bills: dict[date, DayBill] = {}  # adjustments and synthetic rows per bill day
        self.http: Optional[httpx.AsyncClient] = None
        self._tasks: set[asyncio.Task[None]] = set()

    def script(self, order: str) -> Script:
        return self.scripts.get(order) or Script()

    def set_script(self, order: str, script: Script) -> None:
        self.scripts[order] = script
        self.faults_left[order] = {op: fault.times for op in OPERATIONS if (fault := getattr(script.faults, op))}
        self.refund_failures_left[order] = script.refund_fail_times if script.refund == "fail" else 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def fault(self, order: str, op: Operation) -> Optional[JSONResponse]:
        """Count the call; answer with the scripted fault if one is due."""
        self.calls.setdefault(order, Counter())[op] += 1
        left = self.faults_left.get(order, {}).get(op, 0)
        if left == 0:
            return None
        if left > 0:
            self.faults_left[order][op] = left - 1
        fault = getattr(self.script(order).faults, op)
        if fault.mode == "hang":
            await asyncio.sleep(self.settings.simulator_hang_seconds)
            return _error(504, "ACQ.SYSTEM_ERROR", f"{op} timed out inside the provider (scripted hang)")
        return _error(500, "ACQ.SYSTEM_ERROR", f"{op} failed inside the provider (scripted error)")

    # Trade lifecycle -------------------------------------------------------------

    def pay(self, trade: SimTrade, *, after_close: bool = False) -> Optional[str]:
        """The payer pays. Returns why not, or None when the trade is now paid."""
        if trade.trade_status == "TRADE_SUCCESS":
            return "the trade is already paid"
        if trade.trade_status == "TRADE_CLOSED" and not after_close:
            return "the trade is closed"
        if trade.trade_status == "WAIT_BUYER_PAY" and trade.time_expire and _now() > trade.time_expire:
            return "the trade expired"
        script = self.script(trade.out_trade_no)
        if script.paid_amount is not None and trade is self.trades.get(trade.out_trade_no):
            trade.total_amount = f"{Decimal(script.paid_amount):.2f}"
        trade.trade_status = "TRADE_SUCCESS"
        trade.gmt_payment = _now()
        log.info("trade %s (%s) paid", trade.trade_no, trade.out_trade_no)
        self.emit(trade)
        if script.second_charge and trade is self.trades.get(trade.out_trade_no):
            self.spawn(self._later(script.second_charge_delay_seconds, lambda: self.charge_again(trade)))
        return None

    def charge_again(self, first: SimTrade) -> None:
        """The payer pays the same order a second time, through another channel."""
        second = SimTrade(
            trade_no=new_trade_no(),
            out_trade_no=first.out_trade_no,
            total_amount=first.total_amount,
            currency=first.currency,
            subject=first.subject,
            notify_url=first.notify_url,
            time_expire=None,
            pay_url=first.pay_url,
            trade_status="TRADE_SUCCESS",
            gmt_payment=_now(),
        )
        self.extra_trades.setdefault(first.out_trade_no, []).append(second)
        self.orders_by_trade_no[second.trade_no] = first.out_trade_no
        log.info("trade %s (%s) paid a second time", second.trade_no, second.out_trade_no)
        self.emit(second)

    def all_trades(self) -> list[SimTrade]:
        return list(self.trades.values()) + [t for extra in list(self.extra_trades.values()) for t in extra]

    def bill(self, day: date) -> DayBill:
        return self.bills.setdefault(day, DayBill(day, ZoneInfo(self.settings.settlement_timezone)))

    def trades_of(self, order: str) -> list[SimTrade]:
        primary = self.trades.get(order)
        return ([primary] if primary else []) + self.extra_trades.get(order, [])

    # Refunds -----------------------------------------------------------------------

    def submit_refund(self, refund: SimRefund) -> None:
        """Start (or restart) a refund; its scripted outcome comes now or after the delay."""
        refund.refund_status, refund.fail_reason = "REFUND_PROCESSING", None
        delay = self.script(refund.out_trade_no).refund_delay_seconds
        if delay:
            self.spawn(self._later(delay, lambda: self._finish_refund(refund)))
        else:
            self._finish_refund(refund)

    def _finish_refund(self, refund: SimRefund) -> None:
        left = self.refund_failures_left.get(refund.out_trade_no, 0)
        if left != 0:
            self.refund_failures_left[refund.out_trade_no] = left - 1 if left > 0 else left
            refund.refund_status, refund.fail_reason = "REFUND_FAILED", "insufficient merchant balance (scripted)"
        else:
            refund.refund_status, refund.gmt_refund = "REFUND_SUCCESS", _now()
            trade = next(t for t in self.trades_of(refund.out_trade_no) if t.trade_no == refund.trade_no)
            if trade.refunded() >= Decimal(trade.total_amount):
                trade.trade_status, trade.gmt_close = "TRADE_CLOSED", _now()  # fully refunded
        log.info("refund %s of trade %s: %s", refund.out_request_no, refund.trade_no, refund.refund_status)

    def ledger(self, order: str) -> dict[str, Any]:
        trades = self.trades_of(order)
        captured = sum((Decimal(t.total_amount) for t in trades if t.paid), Decimal(0))
        refunded = sum((t.refunded() for t in trades), Decimal(0))
        return {
            "order": order,
            "currency": trades[0].currency if trades else None,
            "captured_minor": int(captured * 100),
            "refunded_minor": int(refunded * 100),
            "net_minor": int((captured - refunded) * 100),
            "trades": [
                {
                    "trade_no": t.trade_no,
                    "trade_status": t.trade_status,
                    "total_amount": t.total_amount,
                    "paid": t.paid,
                    "refunded_amount": f"{t.refunded():.2f}",
                }
                for t in trades
            ],
            "refunds": [r.out() for t in trades for r in t.refunds.values()],
        }

    def close(self, trade: SimTrade) -> None:
        trade.trade_status = "TRADE_CLOSED"
        trade.gmt_close = _now()
        log.info("trade %s (%s) closed", trade.trade_no, trade.out_trade_no)
        script = self.script(trade.out_trade_no)
        if script.after_close == "closed_callback":
            self.spawn(self._later(script.after_close_delay_seconds, lambda: self.emit(trade)))
        elif script.after_close == "pay":
            self.spawn(self._later(script.after_close_delay_seconds, lambda: self.pay(trade, after_close=True)))

    async def _later(self, delay: float, action) -> None:
        await asyncio.sleep(delay)
        action()

    # Callbacks -------------------------------------------------------------------

    def emit(self, trade: SimTrade) -> None:
        """A status change: build its event and deliver it as the order's script says."""
        script = self.script(trade.out_trade_no)
        event_id = "evt_" + secrets.token_hex(12)
        event = {
            "id": event_id,
            "type": "trade.status_changed",
            "created_at": _now().isoformat(),
            "data": {
                "out_trade_no": trade.out_trade_no,
                "trade_no": trade.trade_no,
                "trade_status": trade.trade_status,
                "total_amount": script.callback_amount or trade.total_amount,
                "currency": trade.currency,
                "gmt_payment": trade.gmt_payment.isoformat() if trade.gmt_payment else None,
            },
        }
        if script.callback == "drop":
            self._record(trade, event_id, 0, None, "dropped by script")
            return
        delay = script.callback_delay_seconds if script.callback == "delay" else 0.0
        copies = 2 if script.callback == "duplicate" else 1
        self.spawn(self._deliver(trade, event, delay, copies))

    async def _deliver(self, trade: SimTrade, event: dict[str, Any], delay: float, copies: int) -> None:
        if delay:
            await asyncio.sleep(delay)
        if not trade.notify_url:
            self._record(trade, event["id"], 0, None, "no notify_url on the trade")
            return
        body = json.dumps(event, separators=(",", ":")).encode()
        schedule = self.settings.simulator_resend_seconds
        for _ in range(copies):
            for attempt in range(1, len(schedule) + 2):
                # Signed afresh on every attempt, so the timestamp stays within tolerance.
                headers = signing.signed_headers(self.settings.simulator_webhook_secret, event["id"], body)
                status, error = None, None
                try:
                    assert self.http is not None
                    response = await self.http.post(trade.notify_url, content=body, headers=headers)
                    status = response.status_code
                    if not response.is_success:
                        error = response.text[:200]
                except httpx.HTTPError as err:
                    error = f"{type(err).__name__}: {err}"
                self._record(trade, event["id"], attempt, status, error)
                if status is not None and 200 <= status < 300:
                    break
                if attempt > len(schedule):
                    log.warning("event %s for %s: gave up after %d attempts", event["id"], trade.out_trade_no, attempt)
                    return
                await asyncio.sleep(schedule[attempt - 1])

    def _record(self, trade: SimTrade, event_id: str, attempt: int, status: Optional[int], error: Optional[str]) -> None:
        self.deliveries.setdefault(trade.out_trade_no, []).append(
            {
                "event_id": event_id,
                "trade_status": trade.trade_status,
                "attempt": attempt,
                "at": _now().isoformat(),
                "status_code": status,
                "error": error,
            }
        )
        log.info(
            "callback %s for %s (%s), attempt %d: %s", event_id, trade.out_trade_no, trade.trade_status, attempt, status or error
        )
