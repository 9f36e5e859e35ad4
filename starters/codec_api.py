"""The codec endpoint: Temporal's remote-codec protocol over paysentinel's payload encryption.

POST /codec/encode   {"payloads": [{"metadata": {...}, "data": "<base64>"}]} -> the same, encrypted
POST /codec/decode   the same shape -> decrypted (payloads that are not encrypted come back unchanged)

What calls it: the Temporal Web UI (from the operator's browser) and the ``temporal`` CLI
(``--codec-endpoint http://<host>:<port>/codec --codec-auth 'Bearer <token>'``), so that people
with an operator token see the customer data that the histories only hold encrypted.

Authenticated with the operator bearer tokens (the operator API's own dependency). A browser
cannot add that header to the Web UI's requests, so an operator signs in once at
``GET /codec/login``: ``POST /codec/session`` (with the bearer token) answers with an HttpOnly,
SameSite=Strict cookie scoped to ``/codec`` that carries the token; the codec routes accept it
in place of the header and check it exactly as the header, on every request (a token removed
from PAYSENTINEL_OPERATOR_TOKENS stops working at once). The Web UI sends the cookie when its
codec setting "Include cross-origin credentials" is on. CORS answers only the configured
origins (PAYSENTINEL_CODEC_CORS_ORIGINS, by default the dev server's Web UI).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from paysentinel.codec import EncryptionCodec, PayloadKeyError, keys_for
from paysentinel.config import Settings
from starters.common import resources
from starters.operator_auth import operator

COOKIE = "paysentinel_codec"
SESSION_SECONDS = 8 * 3600
MAX_BODY_BYTES = 8 * 1024 * 1024


def endpoint_url(settings: Settings) -> str:
    """Where this router is served (the operator API's listener): what the Web UI is pointed at."""
    return f"http://{settings.host}:{getattr(settings, 'operator_port', settings.api_port)}/codec"


def _settings(request: Request) -> Settings:
    return request.app.state.resources.settings


def _cors_headers(request: Request) -> dict[str, str]:
    origin = request.headers.get("origin")
    if not origin or origin not in _settings(request).effective_codec_cors_origins:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }


class CodecRoute(APIRoute):
    """CORS on every answer (errors too), and the sign-in cookie standing in for the bearer header."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            token = request.cookies.get(COOKIE)
            if token and "authorization" not in request.headers:
                scope = dict(request.scope)
                scope["headers"] = [*request.scope["headers"], (b"authorization", f"Bearer {token}".encode())]
                request = Request(scope, request.receive)
            try:
                response = await handler(request)
            except HTTPException as exc:
                response = JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
            response.headers.update(_cors_headers(request))
            return response

        return route


router = APIRouter(prefix="/codec", tags=["codec"], route_class=CodecRoute)
_codecs: dict[int, tuple[Settings, EncryptionCodec]] = {}


def _codec(request: Request) -> EncryptionCodec:
    settings = _settings(request)
    cached = _codecs.get(id(settings))
    if cached is None or cached[0] is not settings:
        cached = _codecs[id(settings)] = (settings, EncryptionCodec(keys_for(settings)))
    return cached[1]


async def _payloads(request: Request) -> Payloads:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise HTTPException(413, f"at most {MAX_BODY_BYTES} bytes of payloads per request")
    try:
        return json_format.Parse(body or b"{}", Payloads(), ignore_unknown_fields=True)
    except json_format.ParseError as err:
        expected = '{"payloads": [{"metadata": {...}, "data": "<base64>"}]}'
        raise HTTPException(400, f"expected {expected}: {err}") from err


def _answer(payloads: list) -> Response:
    return Response(json_format.MessageToJson(Payloads(payloads=payloads)), media_type="application/json")


@router.post("/encode", summary="Encrypt payloads (Temporal remote-codec protocol)")
async def encode(request: Request, _: Any = Depends(operator)) -> Response:
    given = await _payloads(request)
    return _answer(await _codec(request).encode(list(given.payloads)))


@router.post("/decode", summary="Decrypt payloads (Temporal remote-codec protocol)")
async def decode(request: Request, _: Any = Depends(operator)) -> Response:
    given = await _payloads(request)
    try:
        return _answer(await _codec(request).decode(list(given.payloads)))
    except PayloadKeyError as err:
        raise HTTPException(422, str(err)) from err


@router.post("/session", summary="Sign in to the codec from a browser (sets an HttpOnly cookie)")
async def sign_in(request: Request, who: Any = Depends(operator)) -> Response:
    token = request.headers["authorization"].partition(" ")[2].strip()
    response = JSONResponse({"operator": getattr(who, "name", who), "expires_in_seconds": SESSION_SECONDS})
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/codec",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.delete("/session", summary="Sign out of the codec")
async def sign_out() -> Response:
    response = JSONResponse({"signed_out": True})
    response.delete_cookie(COOKIE, path="/codec")
    return response


@router.options("/{path:path}", include_in_schema=False)
async def preflight(request: Request) -> Response:
    """CORS preflight of the Web UI's codec requests (JSON body, X-Namespace header)."""
    if not _cors_headers(request):
        return Response(status_code=403)
    return Response(
        status_code=204,
        headers={
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type, X-Namespace, Authorization, Authorization-Extras",
            "Access-Control-Max-Age": "600",
        },
    )


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>paysentinel codec: sign in</title>
<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;line-height:1.5}
input{width:100%;padding:.4rem;font-family:monospace}button{margin-top:.6rem;padding:.4rem 1rem}</style></head>
<body>
<h1>Decoded payloads in the Temporal Web UI</h1>
<p>Payment histories hold customer data only encrypted. Sign in with your operator token so that the
Web UI can have them decoded here; the sign-in lasts 8 hours in this browser.</p>
<form id="f"><label>Operator token <input id="token" type="password" autocomplete="off" required></label>
<button type="submit">Sign in</button></form>
<p id="result" role="status"></p>
<p>In the Web UI, open the codec settings (the <em>Codec Server</em> item of the settings menu), choose
<em>Use my browser setting</em>, enter <code id="endpoint"></code> as the endpoint and turn on
<em>Include cross-origin credentials</em>.</p>
<script>
document.getElementById("endpoint").textContent = location.origin + "/codec";
document.getElementById("f").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = document.getElementById("token").value.trim();
  const answer = await fetch("session", {method: "POST", headers: {"Authorization": "Bearer " + token}});
  const body = await answer.json();
  document.getElementById("result").textContent = answer.ok
    ? "Signed in as " + body.operator + "." : "Not signed in: " + (body.error || answer.status);
});
</script>
</body></html>
"""


@router.get("/login", response_class=HTMLResponse, summary="Browser sign-in page for the codec")
async def login_page(_: Any = Depends(resources)) -> HTMLResponse:
    return HTMLResponse(LOGIN_PAGE)
