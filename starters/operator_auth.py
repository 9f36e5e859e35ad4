"""Who calls the operator API: a bearer token hashed and compared, in constant time, with
every configured operator's hash (PAYSENTINEL_OPERATOR_TOKENS); the roles viewer <
operator < approver; and the ``audit`` table every action (and refusal) is appended to."""

import hashlib
import hmac
from dataclasses import dataclass
from typing import Optional

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from paysentinel import db
from paysentinel.config import OPERATOR_ROLES
from starters.common import (
    Resources,
    resources,
)

bearer = HTTPBearer(auto_error=False)
RANK = {role: rank for rank, role in enumerate(OPERATOR_ROLES)}


@dataclass(frozen=True)
class Operator:
    """Who is calling: the configured name and role, and the address the request came from."""

    name: str
    role: str
    address: str

    def may(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]


def operator(
    request: Request,
    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
    res: Resources = Depends(resources),
) -> Operator:
    """The operator of a valid bearer token (any role: viewer and above); 401 otherwise."""
    given = hashlib.sha256(credentials.credentials.encode()).digest() if credentials else b""
    found = None
    for name, role, digest in res.settings.operators:
        if hmac.compare_digest(given, digest):  # every hash compared: constant time
            found = (name, role)
    if found is None:
        raise HTTPException(
            401, "operator token missing or invalid: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    return Operator(found[0], found[1], request.client.host if request.client else "")


def refuse_role(who: Operator, needed: str, what: str) -> HTTPException:
    article = "an" if needed[0] in "aeiou" else "a"
    return HTTPException(403, f"{who.role} {who.name} may not {what}; ask {article} {needed}")


async def audit(res: Resources, who: Operator, action: str, target: str, reason: str, result: str, detail: str) -> None:
    await db.record_audit(
        res.sessions,
        operator=who.name,
        role=who.role,
        address=who.address,
        action=action,
        target=target,
        reason=reason,
        result=result,
        detail=detail[:2000],
    )
