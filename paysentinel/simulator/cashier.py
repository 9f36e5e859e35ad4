"""The cashier page a payer opens from a trade's pay URL (``/pay/{trade_no}``)."""

from __future__ import annotations

import html
from importlib import resources
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from paysentinel.simulator.provider import Provider
from paysentinel.simulator.trades import SimTrade


def add_cashier_routes(app: FastAPI, provider: Provider) -> None:
    """The cashier page's routes, on ``provider``'s state."""

    @app.get("/pay/{trade_no}", response_class=HTMLResponse)
    async def cashier(trade_no: str):
        trade = provider.trades.get(provider.orders_by_trade_no.get(trade_no, ""))
        if trade is None:
            return HTMLResponse(_page("Unknown trade", f"No trade {trade_no}.", None), status_code=404)
        payable = trade.trade_status == "WAIT_BUYER_PAY"
        return _page(
            f"Pay {trade.total_amount} {trade.currency}",
            f"{trade.subject} — order {trade.out_trade_no}, status {trade.trade_status}.",
            trade if payable else None,
        )

    @app.post("/pay/{trade_no}", response_class=HTMLResponse)
    async def cashier_pay(trade_no: str):
        trade = provider.trades.get(provider.orders_by_trade_no.get(trade_no, ""))
        if trade is None:
            return HTMLResponse(_page("Unknown trade", f"No trade {trade_no}.", None), status_code=404)
        if (why := provider.pay(trade)) is not None:
            return HTMLResponse(_page("Not paid", f"Payment refused: {why}.", None), status_code=409)
        return _page("Paid", f"You paid {trade.total_amount} {trade.currency} for order {trade.out_trade_no}.", None)


def _page(title: str, message: str, payable: Optional[SimTrade]) -> str:
    template = resources.files("paysentinel.simulator").joinpath("cashier.html").read_text()
    button = (
        f'<form method="post" action="/pay/{html.escape(payable.trade_no)}"><button>Pay '
        f"{html.escape(payable.total_amount)} {html.escape(payable.currency)}</button></form>"
        if payable
        else ""
    )
    return template.format(title=html.escape(title), message=html.escape(message), button=button)
