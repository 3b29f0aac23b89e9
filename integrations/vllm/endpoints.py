"""kvplug's routes on ``vllm serve``: its request states, and a policy switch while idle.

A ``vllm.endpoint_plugins`` entry point, loaded only where ``VLLM_PLUGINS``
names it (``VLLM_PLUGINS=kvplug vllm serve ...``; that allowlist keeps loading
the ``kvplug`` general plugin too).  The routes call the worker-side RPCs the
general plugin installs (:mod:`.lifecycle`):

- ``GET /kvplug/request_states``: kvplug's per-request state counts summed over
  the workers (``live`` is 0 once the server has drained);
- ``POST /kvplug/policy`` with a config ``{"policy": ..., params}``: switch the
  server to its policy or one of its ``switch_to`` configs.  A config that is
  not one of those is a 400; a switch while requests are in flight or hold kvplug state
  is a 409 and the engine keeps serving.
"""

from __future__ import annotations

import json
from argparse import Namespace
from http import HTTPStatus

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from kvplug.integrations.vllm.selection import logger

router = APIRouter()


def _error(status: HTTPStatus, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status.value}},
                        status_code=status.value)


def _engine(request: Request):
    return getattr(request.app.state, "kvplug_engine", None)


async def _states(engine) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in await engine.collective_rpc("kvplug_request_states"):
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    return total


@router.get("/kvplug/request_states")
async def request_states(request: Request):
    engine = _engine(request)
    if engine is None:
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "kvplug: this server runs no engine")
    return JSONResponse(await _states(engine))


@router.post("/kvplug/policy")
async def set_policy(request: Request):
    from kvplug.config import PolicyConfig

    engine = _engine(request)
    if engine is None:
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "kvplug: this server runs no engine")
    try:
        config = PolicyConfig.parse(json.loads(await request.body()), "kvplug policy switch")
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        return _error(HTTPStatus.BAD_REQUEST, str(e))
    unfinished = engine.get_num_unfinished_requests()
    if unfinished or (await _states(engine)).get("live", 0):
        return _error(HTTPStatus.CONFLICT, f"kvplug: a policy switch needs an idle server; "
                                           f"{unfinished} requests are unfinished")
    try:
        await engine.collective_rpc("kvplug_set_policy", args=(config.as_dict(),))
    except Exception as e:  # the worker's refusal comes back as the RPC's failure message
        status = HTTPStatus.CONFLICT if "idle" in str(e) else HTTPStatus.BAD_REQUEST
        return _error(status, str(e))
    logger.info("kvplug: policy switch to %s requested over HTTP", config.as_dict())
    return JSONResponse({"policy": config.as_dict()})


class Endpoints:
    """The ``vllm.endpoint_plugins`` entry point (vLLM's ``EndpointPlugin`` protocol)."""

    name = "kvplug"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        state.kvplug_engine = engine_client
