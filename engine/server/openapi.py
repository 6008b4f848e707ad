"""``GET /api/openapi.json``: the API described by hand, as data.

Written by hand rather than generated so the descriptions say what a client
needs to know (which format a body may be in, what a 404 means). The test
``tests/test_server_library.py::test_openapi_covers_every_api_route`` walks the
app's router and fails when an ``/api/`` route has no entry here or an entry
names a route that no longer exists, so the document cannot silently drift.
"""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


def _query(name: str, description: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind, **extra},
            "description": description}


def _op(summary: str, tag: str, responses: dict[str, Any], *, params: list | None = None,
        body: dict[str, Any] | None = None, description: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    return op


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


ANY_OBJECT = {"type": "object", "additionalProperties": True}
JOB_ID = _path_param("job_id", "The id returned when the job was submitted.")
PAGING = [_query("limit", "Most entries to return.", "integer", minimum=1),
          _query("offset", "Entries to skip.", "integer", minimum=0)]

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {
            "error": {"type": "object", "properties": {
                "type": {"type": "string"}, "message": {"type": "string"},
                "details": {}, "extra_info": ANY_OBJECT}},
            "errors": {"type": "array", "items": _ref("ValidationError"),
                       "description": "Every validation problem (job submission only)."},
        },
    },
    "ValidationError": {
        "type": "object",
        "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                       "node_id": {"type": ["string", "null"]}, "node_type": {"type": ["string", "null"]},
                       "input_name": {"type": ["string", "null"]}, "details": {}},
    },
    "Workflow": {
        "description": "A Kiln workflow ({\"version\": 1, \"nodes\": {...}, \"params\": {...}}), a ComfyUI "
                       "API-format prompt ({id: {\"class_type\", \"inputs\"}}) or a ComfyUI editor (UI) workflow.",
        "type": "object", "additionalProperties": True,
    },
    "JobRequest": {
        "type": "object", "required": ["workflow"],
        "properties": {
            "workflow": _ref("Workflow"),
            "params": {"type": "object", "additionalProperties": True,
                       "description": "Named-parameter overrides declared by the workflow's params."},
            "force": {"type": "boolean", "description": "Re-run every node, ignoring cached outputs."},
            "keep_going": {"type": "boolean",
                           "description": "A failing node skips only the nodes that need its result; independent "
                                          "branches run and keep their outputs. The job still ends failed, its "
                                          "error listing every failure (failures) and the nodes skipped (blocked)."},
            "client_id": {"type": "string", "description": "Websocket clientId that receives this job's events."},
            "outputs": {"type": "array", "items": {"type": "string"},
                        "description": "Only these output nodes (and what they need) run."},
            "job_id": {"type": "string", "description": "Optional id chosen by the client."},
            "extra_data": ANY_OBJECT,
        },
    },
    "Progress": {"type": ["object", "null"], "properties": {
        "node_id": {"type": "string"}, "value": {"type": "integer"}, "max": {"type": "integer"}}},
    "Job": {
        "type": "object", "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "interrupted", "cancelled"]},
            "progress": _ref("Progress"),
            "outputs": {"type": "object", "additionalProperties": ANY_OBJECT,
                        "description": "node id -> the node's ui output (e.g. {\"images\": [...]})."},
            "error": {"type": ["object", "null"], "properties": {
                "node_id": {"type": ["string", "null"]}, "node_type": {"type": ["string", "null"]},
                "input_name": {"type": ["string", "null"]}, "message": {"type": "string"},
                "traceback": {}, "exception_type": {"type": ["string", "null"]},
                "failures": {"type": "array", "items": ANY_OBJECT,
                             "description": "Every node that failed (one, unless the job kept going)."},
                "blocked": {"type": "array", "items": {"type": "string"},
                            "description": "Nodes a failure kept from running (a job that kept going)."}}},
            "created": {"type": ["number", "string", "null"]}, "started": {"type": ["number", "string", "null"]},
            "finished": {"type": ["number", "string", "null"]},
            "client_id": {"type": ["string", "null"]}, "number": {"type": ["number", "null"]},
            "params": ANY_OBJECT, "executed": {"type": ["array", "null"]}, "cached": {"type": ["array", "null"]},
            "worker": {"type": ["string", "null"],
                       "description": "The cluster worker that ran the job (kiln serve --cluster); null in-process."},
            "workflow": ANY_OBJECT,
            "artifacts": {"type": "array", "items": _ref("Artifact"),
                          "description": "Every image the job reported, with its safety-filter result."},
            "input_images": {"type": "array", "items": {"type": "object", "properties": {
                "filename": {"type": "string"}, "subfolder": {"type": "string"}, "type": {"type": "string"}}},
                "description": "The pictures the job loaded (LoadImage and other image-upload inputs), as /view refs."},
        },
    },
    "Artifact": {
        "type": "object", "required": ["node_id", "filtered", "finish_reason"],
        "properties": {
            "node_id": {"type": "string"}, "filename": {"type": ["string", "null"]},
            "subfolder": {"type": ["string", "null"]}, "type": {"type": ["string", "null"]},
            "index": {"type": "integer", "description": "For a dropped image: its index in the node's batch."},
            "filtered": {"type": "boolean", "description": "The server's safety filter flagged this image."},
            "finish_reason": {"enum": ["SUCCESS", "FILTER"],
                              "description": "As Stability's API: FILTER when the safety filter flagged the "
                                             "image (blurred, blacked out or, without a file, dropped)."},
        },
    },
    "JobPage": {"type": "object", "properties": {
        "jobs": {"type": "array", "items": _ref("Job")}, "total": {"type": "integer"},
        "limit": {"type": "integer"}, "offset": {"type": "integer"}}},
    "FileRef": {"type": "object", "required": ["name", "subfolder", "type"], "properties": {
        "name": {"type": "string"}, "subfolder": {"type": "string"}, "type": {"enum": ["input", "output", "temp"]}}},
    "UploadForm": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary",
                  "description": "PNG, JPEG, WebP, GIF, BMP or TIFF within the size and pixel limits."},
        "type": {"enum": ["input", "output", "temp"], "default": "input"},
        "subfolder": {"type": "string", "default": ""},
        "overwrite": {"type": "string", "enum": ["true", "false", "1", "0"],
                      "description": "Replace a different file of the same name (otherwise it is renamed)."},
        "original_ref": {"type": "string", "description": "Masks only: JSON {filename, subfolder, type} of "
                                                          "the image the alpha is written into."}}},
    "WorkflowEntry": {"type": "object", "required": ["name", "modified"], "properties": {
        "name": {"type": "string"}, "title": {"type": ["string", "null"]},
        "description": {"type": ["string", "null"]}, "modified": {"type": "string", "format": "date-time"},
        "size": {"type": "integer"}, "error": {"type": "string"}}},
}

FILE_QUERY = [
    {"name": "filename", "in": "query", "required": True, "schema": {"type": "string"},
     "description": "File name; may end in ' [input]', ' [output]' or ' [temp]' (overrides type)."},
    _query("subfolder", "Folder inside the type's root."),
    _query("type", "Which root.", enum=["output", "input", "temp"], default="output"),
    _query("preview", "Re-encode, e.g. 'webp;90' or 'jpeg;80'."),
    _query("channel", "'rgb' drops alpha; 'a' returns only the alpha.", enum=["rgba", "rgb", "a"]),
]
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": _ref("UploadForm")}}}
UPLOAD_RESPONSES = {"200": _json(_ref("FileRef"), "Stored (or found with the same bytes) under this name."),
                    "400": _error("Bad form or file name."), "403": _error("The folder is outside its root."),
                    "413": _error("Over the byte or pixel limit."), "415": _error("Not a supported image.")}
COMFY_NOTE = "ComfyUI-compatible; same route without the /api prefix. Shapes as ComfyUI's server.py."
WS_NOTE = ("Websocket upgrade. ComfyUI JSON messages by default; protocol=kiln sends Kiln events, "
           "encoding=msgpack binary frames. With a token set, pass it as ?token=.")


def _comfy(summary: str, method_responses: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    return _op(summary, "comfyui", method_responses or {"200": _json(ANY_OBJECT)}, description=COMFY_NOTE, **kwargs)


PATHS: dict[str, dict[str, Any]] = {
    "/api/jobs": {
        "post": _op("Submit a job", "jobs",
                    {"201": _json({"type": "object", "properties": {"job_id": {"type": "string"},
                                                                    "id": {"type": "string"},
                                                                    "status": {"type": "string"},
                                                                    "number": {"type": ["number", "null"]}}},
                                  "Queued."),
                     "400": _error("Invalid request or workflow; 'errors' lists every problem."),
                     "413": _error("Body too large.")},
                    body=_json_body(_ref("JobRequest"))),
        "get": _op("List jobs (pending and running first)", "jobs", {"200": _json(_ref("JobPage"))},
                   params=[_query("status", "Comma-separated statuses to include."), *PAGING]),
    },
    "/api/jobs/{job_id}": {
        "get": _op("Job status, progress, outputs and error", "jobs",
                   {"200": _json(_ref("Job")), "404": _error("No such job.")}, params=[JOB_ID]),
    },
    "/api/jobs/{job_id}/cancel": {
        "post": _op("Cancel a pending job or interrupt a running one", "jobs",
                    {"200": _json(ANY_OBJECT), "404": _error("No such job."),
                     "409": _json(ANY_OBJECT, "The job had already ended.")}, params=[JOB_ID]),
    },
    "/api/history": {
        "get": _op("Finished jobs, newest first, paged", "jobs", {"200": _json(_ref("JobPage"))},
                   params=[*PAGING, _query("max_items", "ComfyUI's form: answers in ComfyUI's history shape.",
                                           "integer")]),
        "post": _comfy("Clear or delete history entries", body=_json_body(ANY_OBJECT)),
    },
    "/api/history/{prompt_id}": {
        "get": _comfy("One history entry (ComfyUI's shape)",
                      params=[_path_param("prompt_id", "Job / prompt id.")]),
    },
    "/api/nodes": {
        "get": _op("Every node type's schema", "nodes",
                   {"200": _json({"type": "object", "additionalProperties": ANY_OBJECT})}),
    },
    "/api/models": {
        "get": _op("Model folders", "models", {"200": _json({"type": "array", "items": {"type": "string"}})}),
    },
    "/api/models/{folder}": {
        "get": _op("Model files in one folder (e.g. checkpoints)", "models",
                   {"200": _json({"type": "array", "items": {"type": "string"}}),
                    "404": _error("No such folder.")},
                   params=[_path_param("folder", "Folder under the models directory.")]),
    },
    "/api/models/free": {
        "post": _op("Unload models and free their memory", "models", {"200": _json(ANY_OBJECT)}),
    },
    "/api/cache/clear": {
        "post": _op("Clear the node output cache", "cache", {"200": _json(ANY_OBJECT)}),
    },
    "/api/convert/comfyui": {
        "post": _op("Convert a ComfyUI editor (UI-format) workflow to Kiln's format", "workflows",
                    {"200": _json(_ref("Workflow")), "400": _error("Not an editor file, or a subgraph cycle or "
                                                                   "nesting too deep."),
                     "413": _error("Body too large.")},
                    body=_json_body(ANY_OBJECT),
                    description="The conversion `/prompt`, `/api/jobs` and `kiln run` apply to editor files: "
                                "subgraphs expanded (inner ids `instance:inner`), bypassed/muted nodes, Reroutes "
                                "and Primitive nodes resolved, widget values named by the node's declaration."),
    },
    "/api/convert/api": {
        "post": _op("Convert any workflow document to ComfyUI's API format, as it would run", "workflows",
                    {"200": _json(ANY_OBJECT), "400": _error("Not a workflow."), "413": _error("Body too large.")},
                    body=_json_body(ANY_OBJECT),
                    description="Muted nodes left out and bypassed nodes passed through (their `ui.mode`), "
                                "the rule `kiln run`, `/prompt` and `/api/jobs` apply."),
    },
    "/api/workflows": {
        "get": _op("List the workflow library", "workflows",
                   {"200": _json({"type": "array", "items": _ref("WorkflowEntry")})}),
    },
    "/api/workflows/{name}": {
        "get": _op("Read a saved workflow", "workflows",
                   {"200": _json(_ref("Workflow")), "400": _error("Bad name."), "403": _error("Name leaves the folder."),
                    "404": _error("No such workflow.")},
                   params=[_path_param("name", "File name ending in .json (may include a subfolder).")]),
        "put": _op("Save a workflow (atomic; must parse as a workflow)", "workflows",
                   {"200": _json(_ref("WorkflowEntry"), "Replaced."), "201": _json(_ref("WorkflowEntry"), "Created."),
                    "400": _error("Bad name or not a workflow."), "403": _error("Name leaves the folder."),
                    "413": _error("Body too large.")},
                   params=[_path_param("name", "File name ending in .json.")], body=_json_body(_ref("Workflow"))),
        "delete": _op("Delete a saved workflow", "workflows",
                      {"204": {"description": "Deleted."}, "404": _error("No such workflow.")},
                      params=[_path_param("name", "File name ending in .json.")]),
    },
    "/api/view": {
        "get": _op("A file from output, input or temp", "files",
                   {"200": {"description": "The file: image/png|jpeg|webp inline, anything else as an "
                                           "application/octet-stream attachment.",
                            "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                "format": "binary"}}}},
                    "400": _error("Missing filename or bad type."),
                    "403": _error("The name leaves its folder."), "404": _error("No such file.")},
                   params=FILE_QUERY),
    },
    "/api/upload/image": {"post": _op("Upload an image (ComfyUI's form)", "files", UPLOAD_RESPONSES,
                                      body=UPLOAD_BODY)},
    "/api/upload/mask": {"post": _op("Upload a mask into a copy of original_ref", "files", UPLOAD_RESPONSES,
                                     body=UPLOAD_BODY)},
    "/api/openapi.json": {"get": _op("This document", "meta", {"200": _json(ANY_OBJECT)})},
    "/api/ws": {"get": _op("Job events (websocket)", "events", {"101": {"description": "Switching protocols."}},
                           description=WS_NOTE,
                           params=[_query("clientId", "Receives events of jobs submitted with this client_id."),
                                   _query("protocol", "'kiln' for Kiln events.", enum=["comfyui", "kiln"]),
                                   _query("encoding", "'msgpack' for binary frames.", enum=["json", "msgpack"]),
                                   _query("token", "The bearer token, when the server requires one.")])},
    "/api/prompt": {
        "get": _comfy("Queue size: {exec_info: {queue_remaining}}"),
        "post": _comfy("Queue an API-format prompt",
                       {"200": _json(ANY_OBJECT, "{prompt_id, number, node_errors}"),
                        "400": _json(ANY_OBJECT, "{error, node_errors}")}, body=_json_body(ANY_OBJECT)),
    },
    "/api/queue": {
        "get": _comfy("Running and pending prompts"),
        "post": _comfy("Clear the queue or delete entries", body=_json_body(ANY_OBJECT)),
    },
    "/api/interrupt": {"post": _comfy("Interrupt the running prompt (or the given prompt_id)",
                                      body=_json_body(ANY_OBJECT, required=False))},
    "/api/free": {"post": _comfy("Unload models / free memory", body=_json_body(ANY_OBJECT, required=False))},
    "/api/object_info": {"get": _comfy("Every node's declaration")},
    "/api/object_info/{node_class}": {"get": _comfy("One node's declaration", {
        "200": _json(ANY_OBJECT), "404": _error("Unknown node type.")},
        params=[_path_param("node_class", "Node type name.")])},
    "/api/system_stats": {"get": _comfy("System and device information")},
    "/api/embeddings": {"get": _comfy("Textual-inversion embeddings")},
    "/api/extensions": {"get": _comfy("Front-end extension scripts (none: Kiln installs no code)")},
    "/api/features": {"get": _comfy("Server feature flags")},
}


#: Kiln's own routes, also served under /api/v1/ (always in Kiln's shapes there).
V1_PATHS = ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/cancel", "/api/nodes", "/api/models",
            "/api/models/{folder}", "/api/models/free", "/api/cache/clear", "/api/workflows", "/api/workflows/{name}")


def all_paths() -> dict[str, dict[str, Any]]:
    """Kiln's entries, their /api/v1/ twins, then ComfyUI's frontend routes (which may share a path)."""
    from engine.server import openapi_comfy

    paths = {path: dict(ops) for path, ops in PATHS.items()}
    for path in V1_PATHS:
        paths["/api/v1" + path[len("/api"):]] = dict(PATHS[path])
    paths["/api/v1/history"] = {"get": PATHS["/api/history"]["get"]}
    for path, ops in openapi_comfy.paths().items():
        paths.setdefault(path, {}).update(ops)
    return paths


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": "1",
                 "description": "Node-graph diffusion engine. Kiln's API plus ComfyUI-compatible routes. "
                                "With a token configured every route needs 'Authorization: Bearer <token>'; "
                                "state-changing requests from another browser origin are refused."},
        "paths": all_paths(),
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
    }


#: The document never changes while the server runs: encoded once, not on every request.
TEXT = json.dumps(document())


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=TEXT, content_type=JSON)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", openapi_json)
