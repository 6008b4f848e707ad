"""Websocket connections and the routing of job events to them.

Each socket gets its own outbox and sender task, so one slow client never holds
back another or the worker thread. Events are addressed by the ``client_id`` the
job was submitted with; there is no global "current client".

Throttling: progress (and queue status) messages are *coalesced*, not queued. A
socket holds at most one pending progress message per job, replaced by that job's
every newer one (so a client watching a cross-job batch sees each job's progress and
preview, not only the last job's), and sends them at most ``rate`` times a second; any other event first flushes the
pending progress, so order is kept and the last progress is always delivered.
A sampler ticking a thousand times a second therefore costs a slow client a few
messages, while "executed" and "execution_success" are never dropped.

Ordering against HTTP: the route that queues a job *holds* its id here before the
job is stored and *releases* it once the reply (which carries the id) has been
written. Events of a held job wait in order, so no client ever hears about a
job it does not know yet; a fully cached job can otherwise finish, on another
thread, before its ``/prompt`` reply leaves (comfy-script then waited forever).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.events import Event, JobInterrupted, NodeMessage, Progress
from engine.server import comfy_messages as cm

log = logging.getLogger(__name__)

COMFY, KILN = "comfyui", "kiln"


@dataclass
class Outgoing:
    """One thing to send: a job event, or a queue-status update (``event`` None)."""

    event: Event | None = None
    queue_remaining: int = 0


class Client:
    """One websocket: its protocol, outbox and the task draining it."""

    def __init__(self, ws: web.WebSocketResponse, client_id: str, protocol: str = COMFY,
                 encoding: str = "json", rate: float = 20.0) -> None:
        self.ws, self.client_id, self.protocol, self.encoding = ws, client_id, protocol, encoding
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._outbox: collections.deque[Outgoing] = collections.deque()
        #: job id -> its latest progress not sent yet (insertion order kept)
        self._pending_progress: dict[str, Outgoing] = {}
        self._pending_status: Outgoing | None = None
        self._last_progress = 0.0
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: The client's ``feature_flags`` message, once it sent one (ComfyUI's frontend does).
        self.features: dict[str, Any] | None = None

    # -- filling (event-loop thread only) ---------------------------------------------

    def put(self, item: Outgoing) -> None:
        if self._closed:
            return
        if item.event is None:
            self._pending_status = item
        elif isinstance(item.event, Progress) and not getattr(item.event.preview, "output", False):
            # only each job's latest sampling step matters: coalesced per job
            self._pending_progress[item.event.job_id] = item
        else:
            self._outbox.extend(self._pending_progress.values())
            self._pending_progress.clear()
            self._outbox.append(item)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # -- draining ---------------------------------------------------------------------

    async def run(self) -> None:
        """Send until the socket closes; never raises."""
        try:
            while not self._closed and not self.ws.closed:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox and not self.ws.closed:
                    await self._send(self._outbox.popleft())
                if self._pending_status is not None:
                    item, self._pending_status = self._pending_status, None
                    await self._send(item)
                if self._pending_progress:
                    wait = self._last_progress + self.interval - time.monotonic()
                    if wait > 0:
                        if self._timer is None:
                            self._timer = asyncio.get_running_loop().call_later(wait, self._tick)
                        continue
                    items = list(self._pending_progress.values())
                    self._pending_progress.clear()
                    self._last_progress = time.monotonic()
                    for item in items:
                        await self._send(item)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        except Exception:  # a bad frame must not kill the server
            log.exception("websocket sender for %s failed", self.client_id)
        finally:
            if self._timer is not None:
                self._timer.cancel()

    def _tick(self) -> None:
        self._timer = None
        self._wake.set()

    async def _send(self, item: Outgoing) -> None:
        for frame in self.frames(item):
            if isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            else:
                await self.ws.send_str(frame)

    # -- encoding ---------------------------------------------------------------------

    def frames(self, item: Outgoing) -> list[str | bytes]:
        """The wire frames of one item in this socket's protocol."""
        if self.protocol == KILN:
            return self._kiln_frames(item)
        if item.event is None:
            return [_dumps({"type": "status", "data": status_data(item.queue_remaining)})]
        event = item.event
        if isinstance(event, NodeMessage):
            # A binary TEXT frame only for clients that negotiated features (ComfyUI's
            # frontend shows it as progress_text): simple clients such as
            # comfy-api-simplified take every binary frame for an image.
            return [cm.text_frame(event.node_id, event.message)] if self.features is not None else []
        frames: list[str | bytes] = [_dumps({"type": t, "data": d}) for t, d in cm.to_comfy(event)]
        if isinstance(event, Progress) and event.preview is not None:
            frames.append(cm.preview_frame(event.preview))
        return frames

    def _kiln_frames(self, item: Outgoing) -> list[str | bytes]:
        if item.event is None:
            payload: dict[str, Any] = {"type": "status", "queue_remaining": item.queue_remaining}
            preview = None
        else:
            payload = item.event.to_dict()
            preview = getattr(item.event, "preview", None)
        if self.encoding == "msgpack":
            import msgpack

            if preview is not None:
                payload["preview"] = {"mime": preview.mime, "width": preview.width, "height": preview.height,
                                      "data": preview.data}
            return [msgpack.packb(payload, use_bin_type=True, default=str)]
        frames: list[str | bytes] = [_dumps(payload)]
        if preview is not None:
            frames.append(cm.preview_frame(preview))
        return frames


def status_data(queue_remaining: int, sid: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": queue_remaining}}}
    if sid is not None:
        data["sid"] = sid
    return data


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, default=str)


#: Events a job without a client id still sends to every socket (as ComfyUI does).
_BROADCAST_WITHOUT_CLIENT = (Progress, JobInterrupted)


class Hub:
    """Every open websocket, by client id. All methods run on the event loop."""

    def __init__(self) -> None:
        self._clients: dict[str, set[Client]] = {}
        self._tasks: set[asyncio.Task] = set()
        #: Job id -> its events waiting for the job's HTTP reply to be written.
        self._held: dict[str, list[tuple[str | None, Event]]] = {}

    def add(self, client: Client) -> None:
        self._clients.setdefault(client.client_id, set()).add(client)
        task = asyncio.get_running_loop().create_task(client.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def remove(self, client: Client) -> None:
        client.close()
        group = self._clients.get(client.client_id)
        if group is not None:
            group.discard(client)
            if not group:
                del self._clients[client.client_id]

    def clients(self, client_id: str | None = None) -> list[Client]:
        if client_id is None:
            return [c for group in self._clients.values() for c in group]
        return list(self._clients.get(client_id, ()))

    def __len__(self) -> int:
        return sum(len(g) for g in self._clients.values())

    def hold(self, job_id: str) -> None:
        """Keep this job's events back until :meth:`release` (its reply is being written)."""
        self._held.setdefault(job_id, [])

    def release(self, job_id: str) -> None:
        """Send the events held for this job, in order, and stop holding them."""
        for client_id, event in self._held.pop(job_id, []):
            self._deliver(client_id, event)

    def publish(self, client_id: str | None, event: Event, previews: bool = True) -> None:
        """Deliver a job's event to the sockets of the client that submitted it.

        ``previews`` False strips the preview image from progress events (the
        job's preview method is ``none``; see engine.server.previews). Output images
        sent as preview frames (SaveImageWebsocket) always go: they are results.
        """
        if not previews and isinstance(event, Progress) and event.preview is not None and not event.preview.output:
            event = dataclasses.replace(event, preview=None)
        held = self._held.get(event.job_id)
        if held is not None:
            held.append((client_id, event))
            return
        self._deliver(client_id, event)

    def _deliver(self, client_id: str | None, event: Event) -> None:
        if client_id:
            targets = self.clients(client_id)
        elif isinstance(event, _BROADCAST_WITHOUT_CLIENT):
            targets = self.clients()
        else:
            targets = []
        item = Outgoing(event=event)
        for client in targets:
            client.put(item)

    def broadcast_status(self, queue_remaining: int) -> None:
        item = Outgoing(queue_remaining=queue_remaining)
        for client in self.clients():
            client.put(item)

    async def close_all(self) -> None:
        for client in self.clients():
            client.close()
            await client.ws.close()
        for task in list(self._tasks):
            task.cancel()
