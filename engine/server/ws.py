"""The websocket route ``/ws?clientId=ID[&protocol=kiln][&encoding=msgpack]``.

ComfyUI's JSON messages by default, so ComfyUI clients work unchanged; Kiln's typed
events with ``protocol=kiln`` (JSON text frames, or msgpack binary frames with
previews as raw bytes). The socket only registers itself with the hub; the hub
decides what it receives.
"""
from __future__ import annotations

import json
import uuid

from aiohttp import WSMsgType, web

from engine.server.hub import COMFY, KILN, Client, status_data
from engine.server.state import STATE
from engine.server.store import ACTIVE

#: Kiln's answer to a client's ``feature_flags`` message.
SERVER_FEATURES = {"supports_preview_metadata": False, "kiln_protocol": True, "msgpack": True}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    protocol = KILN if request.query.get("protocol") == KILN else COMFY
    encoding = "msgpack" if protocol == KILN and request.query.get("encoding") == "msgpack" else "json"
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1024 * 1024)
    await ws.prepare(request)
    client = Client(ws, client_id, protocol, encoding, rate=state.settings.progress_per_second)
    queue_remaining = state.store.count(ACTIVE)
    if protocol == COMFY:
        await ws.send_str(json.dumps({"type": "status", "data": status_data(queue_remaining, sid=client_id)}))
    else:
        first = {"type": "status", "queue_remaining": queue_remaining, "sid": client_id}
        if encoding == "msgpack":
            import msgpack

            await ws.send_bytes(msgpack.packb(first, use_bin_type=True))
        else:
            await ws.send_str(json.dumps(first))
    state.hub.add(client)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("type") == "feature_flags":
                flags = data.get("data")
                client.features = dict(flags) if isinstance(flags, dict) else {}
                await ws.send_str(json.dumps({"type": "feature_flags", "data": SERVER_FEATURES}))
    finally:
        state.hub.remove(client)
    return ws


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws", websocket)
    app.router.add_get("/api/ws", websocket)
