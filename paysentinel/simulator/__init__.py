"""A payment provider simulator with Alipay-like trade semantics and scripted failures.

It is a real HTTP service: the worker talks to it exactly as it would talk to a
provider, and it sends signed callbacks to the webhook receiver. A control API
scripts what each order's payer and the provider do (see ``trades.Script``).
"""
