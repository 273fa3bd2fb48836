"""Debug endpoints on the REST and monitoring ports: `GET /v1/batchproxy/replicas` shows, per
replica and model, the learned cost (a, b), concurrency, batches in flight and expected free
time: what the adaptive policy plans with."""

from __future__ import annotations

import orjson
from aiohttp import web

from batchproxy.fleet.slots import ReplicaPool
from batchproxy.fleet.snapshot import fleet_snapshot

REPLICAS_PATH = "/v1/batchproxy/replicas"


def debug_routes(pool: ReplicaPool) -> list[web.RouteDef]:
    async def replicas(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(fleet_snapshot(pool), option=orjson.OPT_INDENT_2),
                            content_type="application/json")

    return [web.get(REPLICAS_PATH, replicas)]
