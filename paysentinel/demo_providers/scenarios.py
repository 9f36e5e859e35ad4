"""The demo's scenarios per provider: what happens to each payment, the status we must end
in, the provider's ledger at the end, and any further promise to check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from paysentinel.demo_providers.system import AMOUNT_MINOR


# --- Scenarios -----------------------------------------------------------------------------------

Check = Callable[["ProviderScenario"], Optional[str]]


@dataclass
class ProviderScenario:
    name: str
    story: str
    expected: str  # our status at the end
    captured: int  # the provider's ledger at the end (minor units)
    refunded: int
    script: Optional[dict] = None  # PUT /control/scripts/<order> before the checkout
    pay: Optional[dict] = None  # POST /control/pay/<order> once the trade exists (the payer pays)
    refunds: list[tuple[str, int]] = field(default_factory=list)  # (Idempotency-Key, amount) once SUCCEEDED
    expires_in_seconds: float = 60
    check: Optional[Check] = None  # a further promise: None when kept, else what differs
    order_id: str = ""
    actual: str = "…"
    actual_review: Optional[str] = None
    ledger: Optional[dict] = None
    row: Optional[tuple[int, int]] = None  # ours: (paid, refunded)
    view: dict = field(default_factory=dict)
    refund_ids: list[str] = field(default_factory=list)
    problem: str = ""
    seconds: float = 0.0
    error: str = ""

    @property
    def provider_net(self) -> Optional[int]:
        return None if self.ledger is None else self.ledger["net_minor"]

    @property
    def our_net(self) -> Optional[int]:
        return None if self.row is None else self.row[0] - self.row[1]

    @property
    def books_agree(self) -> bool:
        return self.ledger is not None and self.row is not None and self.provider_net == self.our_net

    @property
    def ok(self) -> bool:
        return (
            self.actual == self.expected
            and self.books_agree
            and self.ledger is not None
            and (self.ledger["captured_minor"], self.ledger["refunded_minor"]) == (self.captured, self.refunded)
            and not self.problem
            and not self.error
        )


def _paid_detail(s: ProviderScenario) -> str:
    return " ".join(e.get("detail") or "" for e in s.view.get("timeline", []) if e.get("event") == "paid")


def _confirmed_by(how: str) -> Check:
    def check(s: ProviderScenario) -> Optional[str]:
        detail = _paid_detail(s)
        return None if f"confirmed by {how}" in detail else f"paid event says {detail or 'nothing'!r}"

    return check


def _never_closed(s: ProviderScenario) -> Optional[str]:
    return "closed as unpaid" if any(e.get("event") == "closed" for e in s.view.get("timeline", [])) else None


def _one_refund(submissions: Optional[int] = None) -> Check:
    def check(s: ProviderScenario) -> Optional[str]:
        if len(set(s.refund_ids)) != 1:
            return f"refund ids {s.refund_ids}"
        made = (s.ledger or {}).get("refunds", [])
        if len(made) != 1:
            return f"{len(made)} refunds at the provider"
        if submissions is not None and made[0].get("submissions") != submissions:
            return f"submitted {made[0].get('submissions')} time(s), expected {submissions}"
        return None

    return check


def _both(*checks: Check) -> Check:
    def check(s: ProviderScenario) -> Optional[str]:
        return next((p for p in (c(s) for c in checks) if p), None)

    return check


def provider_scenarios(provider: str) -> list[ProviderScenario]:
    """The scenarios ``provider``'s fake supports (its own script keys: tests/fakes/<provider>.py)."""
    paid: dict[str, Any] | None
    lost: dict[str, Any]
    never: dict[str, Any] | None
    pay: dict[str, Any] | None
    at_close: dict[str, Any]
    retried: dict[str, Any]
    if provider == "alipay":
        paid, lost, never = None, {"notify": "drop"}, None
        pay = {}  # the buyer scans and pays through the fake's control route
        at_close = {"notify": "drop", "pay_on_close": True}
        retried = {
            "failures": [
                {"method": "alipay.trade.refund", "code": "40004", "sub_code": "ACQ.SYSTEM_ERROR", "times": 1, "after": True}
            ]
        }
    elif provider == "wechatpay":
        paid, lost, never = {"pay": "immediately"}, {"pay": "immediately", "notify": "drop"}, {"pay": "never"}
        pay = None
        at_close = {"pay": "never", "pay_while_closing": True, "notify": "drop"}
        retried = {"pay": "immediately", "errors": {"refund": {"code": "SYSTEM_ERROR", "times": 1, "after": True}}}
    elif provider == "stripe":
        paid, never = {"pay": "immediately"}, None
        lost = {"pay": "immediately", "lose_events": ["payment_intent.succeeded"]}
        pay = None
        at_close = {"pay_on_cancel": True, "lose_events": ["payment_intent.succeeded"]}
        retried = {"pay": "immediately", "refund_error_after_create": 1}
    else:
        raise ValueError(f"no fake for {provider}")
    word = {"alipay": "notification", "wechatpay": "notification", "stripe": "webhook event"}[provider]
    items = [
        ProviderScenario(
            "paid", f"payer pays, the {word} arrives", "SUCCEEDED", AMOUNT_MINOR, 0, paid, pay, check=_confirmed_by("callback")
        ),
        ProviderScenario(
            f"{word} lost",
            f"paid, the {word} never arrives: found by query",
            "SUCCEEDED",
            AMOUNT_MINOR,
            0,
            lost,
            pay,
            check=_confirmed_by("query"),
        ),
        ProviderScenario(
            "never pays", "payer walks away: closed at the time to live", "CLOSED", 0, 0, never, expires_in_seconds=5
        ),
        ProviderScenario(
            "paid at close",
            "payer pays the moment we close: kept as paid",
            "SUCCEEDED",
            AMOUNT_MINOR,
            0,
            at_close,
            expires_in_seconds=5,
            check=_confirmed_by("close"),
        ),
        ProviderScenario(
            "refund twice",
            "paid, 30.00 refunded, the same refund request sent twice: refunds once",
            "PARTIALLY_REFUNDED",
            AMOUNT_MINOR,
            3000,
            paid,
            pay,
            refunds=[("r1", 3000), ("r1", 3000)],
            check=_one_refund(),
        ),
        ProviderScenario(
            "refund answer lost",
            "paid, the refund is made but its answer lost: the retry with the same refund number refunds nothing twice",
            "PARTIALLY_REFUNDED",
            AMOUNT_MINOR,
            3000,
            retried,
            pay,
            refunds=[("r1", 3000)],
            check=_one_refund(2 if provider == "alipay" else None),
        ),
    ]
    if provider == "alipay":
        items[-1].name, items[-1].story = (
            "refund retried",
            "paid, Alipay makes the refund but its answer is lost: resubmitted with the same out_request_no, refunded once",
        )
    if provider == "wechatpay":
        items.append(
            ProviderScenario(
                "USERPAYING at close",
                "payer still entering the password at the time to live: not closed as unpaid, paid a moment later",
                "SUCCEEDED",
                AMOUNT_MINOR,
                0,
                {"pay": "immediately", "userpaying": True, "userpaying_then": "pay", "userpaying_seconds": 9},
                expires_in_seconds=5,
                check=_never_closed,
            )
        )
    if provider == "stripe":
        items.append(
            ProviderScenario(
                "processing at close",
                "the payment is still processing at the time to live: not cancelled, succeeds",
                "SUCCEEDED",
                AMOUNT_MINOR,
                0,
                {"pay": "immediately", "processing_seconds": 9, "processing_outcome": "succeeded"},
                expires_in_seconds=5,
                check=_never_closed,
            )
        )
    return items
