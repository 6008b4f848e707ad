"""OpenAPI entries for the routes ComfyUI's frontend uses (users, settings, user data, jobs,
models, templates, ``/internal``), kept apart from Kiln's own so ``openapi.py`` stays readable.
"""
from __future__ import annotations

from typing import Any


def paths() -> dict[str, dict[str, Any]]:
    """The entries, built with openapi.py's helpers (imported here: openapi.py calls this)."""
    from engine.server.openapi import ANY_OBJECT, _comfy as comfy, _error as error, _json as json_response
    from engine.server.openapi import _json_body as json_body, _path_param as path_param, _query as query

    return _paths(ANY_OBJECT, comfy, error, json_response, json_body, path_param, query)


def _paths(ANY_OBJECT: Any, comfy: Any, error: Any, json_response: Any, json_body: Any, path_param: Any,
           query: Any) -> dict[str, dict[str, Any]]:
    STRINGS = {"type": "array", "items": {"type": "string"}}
    FILE_PARAM = path_param("file", "User-data path, URL-encoded (workflows/x.json is Kiln's workflow library).")
    SETTING_ID = path_param("id", "A setting id such as 'Comfy.Locale' (never a path).")
    COMFY_JOB = {"type": "object", "properties": {
        "id": {"type": "string"},
        "status": {"enum": ["pending", "in_progress", "completed", "failed", "cancelled"]},
        "priority": {"type": "number"}, "create_time": {"type": "integer", "description": "ms since the epoch"},
        "execution_start_time": {"type": "integer"}, "execution_end_time": {"type": "integer"},
        "outputs_count": {"type": "integer"}, "previewable_outputs_count": {"type": "integer"},
        "preview_output": ANY_OBJECT, "workflow_id": {"type": "string"}, "execution_error": ANY_OBJECT,
        "outputs": ANY_OBJECT, "execution_status": ANY_OBJECT, "workflow": ANY_OBJECT}}
    SHAPE_NOTE = ("Shared with Kiln's job API: ComfyUI's shape when the request has a Comfy-User header, "
                  "a sort_by/sort_order/workflow_id parameter or a pending/in_progress/completed status; "
                  "Kiln's shape otherwise (always Kiln's under /api/v1/).")


    def both(path: str, ops: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """ComfyUI serves its routes with and without /api; only the /api form is listed."""
        return {f"/api{path}": ops}


    entries: dict[str, dict[str, Any]] = {
        **both("/users", {
            "get": comfy("Single-user mode: {storage: 'server', migrated: true}"),
            "post": comfy("Add a user (refused: single-user mode)", {"400": error("Single-user mode.")},
                          body=json_body(ANY_OBJECT))}),
        **both("/settings", {
            "get": comfy("Every setting of the user (DATA/user/default/comfy.settings.json)"),
            "post": comfy("Merge settings", {"200": {"description": "Saved."}, "400": error("Bad JSON or setting id."),
                                             "413": error("Over 1 MiB.")}, body=json_body(ANY_OBJECT))}),
        **both("/settings/{id}", {
            "get": comfy("One setting's value (null when unset)", params=[SETTING_ID]),
            "post": comfy("Set one setting (the body is its JSON value)",
                          {"200": {"description": "Saved."}, "400": error("Bad id or JSON."), "413": error("Too large.")},
                          params=[SETTING_ID], body=json_body({}))}),
        **both("/userdata", {"get": comfy("List a user-data folder", {
            "200": json_response({"type": "array"}), "400": error("No dir."), "403": error("Leaves the folder."),
            "404": error("No such folder.")}, params=[
            query("dir", "Folder, e.g. 'workflows'."), query("recurse", "true: include sub-folders."),
            query("full_info", "true: {path, size, modified, created} entries."),
            query("split", "true: [path, ...parts] entries.")])}),
        **both("/v2/userdata", {"get": comfy("Files and folders under a user-data path", {
            "200": json_response({"type": "array"}), "400": error("Not a folder."), "403": error("Leaves the folder."),
            "404": error("No such path.")}, params=[query("path", "Folder inside user data ('' = the root).")])}),
        **both("/userdata/{file}", {
            "get": comfy("A user-data file (a Kiln-format library workflow comes back in ComfyUI's editor format)",
                         {"200": {"description": "The file."}, "403": error("Leaves the folder."),
                          "404": error("No such file.")}, params=[FILE_PARAM]),
            "post": comfy("Write a user-data file (the raw body; atomic)", {
                "200": json_response({}), "403": error("Leaves the folder."), "409": error("Exists and overwrite=false."),
                "413": error("Over 16 MiB.")}, params=[FILE_PARAM, query("overwrite", "'false' refuses to replace."),
                                                       query("full_info", "true: answer with file info.")],
                body={"required": True, "content": {"application/octet-stream": {"schema": {"type": "string"}}}}),
            "delete": comfy("Delete a user-data file", {"204": {"description": "Deleted."},
                                                        "404": error("No such file.")}, params=[FILE_PARAM])}),
        **both("/userdata/{file}/move/{dest}", {"post": comfy("Move or rename a user-data file", {
            "200": json_response({}), "403": error("Leaves the folder."), "404": error("No such file."),
            "409": error("Destination exists and overwrite=false.")}, params=[
            FILE_PARAM, path_param("dest", "Destination user-data path."), query("overwrite", "'false' refuses."),
            query("full_info", "true: file info.")])}),
        **both("/experiment/models", {"get": comfy("Every model folder Kiln reads, with its path")}),
        **both("/experiment/models/{folder}", {"get": comfy("Models in a folder (the loaders' own listing)", {
            "200": json_response({"type": "array"}), "400": error("Bad folder."), "404": error("No such folder.")},
            params=[path_param("folder", "Model folder, e.g. checkpoints.")])}),
        **both("/experiment/models/preview/{folder}/{index}/{filename}", {"get": comfy(
            "A model's preview picture (Kiln keeps none: 404)", {"404": error("No preview.")},
            params=[path_param("folder", "Model folder."), path_param("index", "Folder index (0)."),
                    path_param("filename", "Model file.")])}),
        **both("/view_metadata/{folder}", {"get": comfy("A .safetensors file's __metadata__", {
            "200": json_response(ANY_OBJECT), "403": error("Leaves the folder."), "404": error("No file or metadata.")},
            params=[path_param("folder", "Model folder."), query("filename", "File name ending in .safetensors.")])}),
        **both("/workflow_templates", {"get": comfy("Node packages' templates (none: Kiln's are core templates)")}),
        **both("/i18n", {"get": comfy("Extra translations (none)")}),
        **both("/global_subgraphs", {"get": comfy("Shared subgraph blueprints (none)")}),
        "/api/jobs/cancel": {"post": comfy("Cancel several jobs (ComfyUI's batch cancel)", {
            "200": json_response({"type": "object", "properties": {"cancelled": {"type": "boolean"}}}),
            "400": error("job_ids missing or invalid.")}, body=json_body(ANY_OBJECT))},
        "/internal/folder_paths": {"get": comfy("Model folder -> its paths")},
        "/internal/files/{type}": {"get": comfy("File names in input, output or temp, newest first", {
            "200": json_response(STRINGS), "400": error("Bad type.")},
            params=[path_param("type", "input, output or temp")])},
        "/internal/logs": {"get": comfy("Recent server log lines as one string")},
        "/internal/logs/raw": {"get": comfy("Recent log entries {entries: [{t, m}], size}")},
        "/internal/logs/subscribe": {"patch": comfy("Subscribe to log lines (accepted; the panel polls)",
                                                    {"200": {"description": "OK."}}, body=json_body(ANY_OBJECT))},
        "/templates/{path}": {"get": comfy("Kiln's shipped workflows as ComfyUI templates: index.json, "
                                           "{name}.json (editor format), {name}-1.png (a drawing of the graph)", {
            "200": {"description": "JSON or PNG."}, "404": error("No such template file.")},
            params=[path_param("path", "index.json, NAME.json or NAME-1.png")])},
        "/user.css": {"get": comfy("The user's stylesheet (empty when none)", {"200": {"description": "text/css"}})},
    }

    COMFY_JOB_LIST = {"type": "object", "properties": {"jobs": {"type": "array", "items": COMFY_JOB}, "pagination": {
        "type": "object", "properties": {"offset": {"type": "integer"}, "limit": {"type": ["integer", "null"]},
                                         "total": {"type": "integer"}, "has_more": {"type": "boolean"}}}}}
    shared = {
        "get": comfy("List jobs: ComfyUI's jobs API or Kiln's list (see the description)", {
            "200": json_response({"oneOf": [COMFY_JOB_LIST, {"$ref": "#/components/schemas/JobPage"}]}),
            "400": error("Unknown status or bad paging.")}, params=[
            query("status", "Comma-separated: ComfyUI's pending,in_progress,completed,failed,cancelled or "
                            "Kiln's queued,running,succeeded,failed,interrupted,cancelled."),
            query("limit", "Most entries.", "integer"), query("offset", "Entries to skip.", "integer"),
            query("sort_by", "ComfyUI: created_at or execution_duration."),
            query("sort_order", "ComfyUI: asc or desc."), query("workflow_id", "ComfyUI: only this workflow's jobs.")]),
    }
    for op in shared.values():
        op["description"] = SHAPE_NOTE
    entries["/api/jobs"] = shared
    one = {"get": comfy("One job: ComfyUI's job (with outputs, workflow) or Kiln's", {
        "200": json_response({"oneOf": [COMFY_JOB, {"$ref": "#/components/schemas/Job"}]}),
        "404": error("No such job.")}, params=[path_param("job_id", "Job / prompt id.")])}
    cancel = {"post": comfy("Cancel a job: ComfyUI's {cancelled} or Kiln's answer", {
        "200": json_response(ANY_OBJECT), "404": error("No such job (Kiln's shape)."),
        "409": json_response(ANY_OBJECT, "Already ended (Kiln's shape).")},
        params=[path_param("job_id", "Job / prompt id.")])}
    for op in (*one.values(), *cancel.values()):
        op["description"] = SHAPE_NOTE
    entries["/api/jobs/{job_id}"] = one
    entries["/api/jobs/{job_id}/cancel"] = cancel
    return entries
