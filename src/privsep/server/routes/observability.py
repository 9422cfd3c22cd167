"""What an operator reads to see what the server is doing: its metrics (Prometheus text
format) and its API document (OpenAPI). Both behind the operator session, like every other
operator route: neither is for an unauthenticated prober, and no work token carries the
``operator`` scope, so a sandbox cannot read them either."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from privsep.server.auth import Operator_, OperatorPrincipal
from privsep.server.errors import ERROR_RESPONSES
from privsep.server.metrics import CONTENT_TYPE, render

router = APIRouter(prefix="/v1/operator", tags=["operator"], responses=ERROR_RESPONSES)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "The metrics"}},
)
def metrics(me: OperatorPrincipal = Operator_) -> Response:
    """The server's metrics in the Prometheus text format: every worker's, summed, when the
    server runs several."""
    return Response(render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json")
def openapi_document(request: Request, me: OperatorPrincipal = Operator_) -> dict[str, Any]:
    """The OpenAPI document of this server's API (what ``runner api spec`` prints offline)."""
    document: dict[str, Any] = request.app.openapi()
    return document
