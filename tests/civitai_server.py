"""A Civitai-compatible HTTP server on 127.0.0.1, for tests (no network).

Its answers follow Civitai's documented REST API v1 (developer.civitai.com, "Model versions" and
"Models"; the REST API reference's Authorization section): ``/api/v1/model-versions/{id}``,
``/api/v1/model-versions/by-hash/{hash}``, ``/api/v1/models/{id}``, and the download endpoint
``/api/download/models/{versionId}``, which answers with a redirect to a signed file URL, as
civitai.com does. The file URL honours ``Range: bytes=N-`` (206 + Content-Range, 416 past the end).

Behaviours a test can switch on per version: ``needs_token`` (401 without ``Authorization: Bearer
<token>``), ``rate_limit`` (429 with Retry-After for the first N API calls), ``corrupt`` (the bytes
served differ from the hash the API gives), ``cut_after`` (the first download stops after N bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlparse


@dataclass
class Version:
    id: int
    model_id: int
    data: bytes
    file_name: str
    base_model: str = "SDXL 1.0"
    name: str = "v1.0"
    trained_words: list[str] = field(default_factory=list)
    api_sha256: Optional[str] = None  # what the API claims (default: the real one)
    extra_files: list[dict] = field(default_factory=list)
    safetensors: bool = True
    needs_token: bool = False
    corrupt: bool = False
    cut_after: Optional[int] = None

    def sha256(self) -> str:
        return (self.api_sha256 or hashlib.sha256(self.data).hexdigest()).upper()


@dataclass
class Model:
    id: int
    name: str
    creator: str
    allow_derivatives: bool = True
    allow_commercial_use: list[str] = field(default_factory=lambda: ["Image", "RentCivit"])
    allow_no_credit: bool = False
    allow_different_license: bool = False


class CivitaiServer:
    def __init__(self, token: Optional[str] = None):
        self.token = token
        self.models: dict[int, Model] = {}
        self.versions: dict[int, Version] = {}
        self.rate_limit = 0  # the next N API calls answer 429
        self.retry_after = "1"
        self.requests: list[tuple[str, str, Optional[str], Optional[str]]] = []  # method, path, Authorization, Range
        self._cut_done: set[int] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "CivitaiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, model: Model, *versions: Version) -> None:
        self.models[model.id] = model
        for v in versions:
            self.versions[v.id] = v

    # ------------------------------------------------------------------ documents

    def version_doc(self, v: Version) -> dict:
        m = self.models[v.model_id]
        fmt = "SafeTensor" if v.safetensors else "PickleTensor"
        ext = ".safetensors" if v.safetensors else ".pt"
        name = v.file_name if v.safetensors else v.file_name.rsplit(".", 1)[0] + ext
        sha = v.sha256()
        main = {
            "id": v.id * 10, "name": name, "type": "Model", "sizeKB": len(v.data) / 1024,
            "metadata": {"format": fmt, "size": None, "fp": "fp16"},
            "pickleScanResult": "Success", "virusScanResult": "Success",
            "hashes": {"AutoV1": "0BADC0DE", "AutoV2": sha[:10], "SHA256": sha, "CRC32": "DAEE95B7",
                       "BLAKE3": "1A411D9B" * 8, "AutoV3": _tensor_hash(v.data)[:12].upper()},
            "downloadUrl": f"{self.url}/api/download/models/{v.id}", "primary": True,
        }
        return {
            "id": v.id, "modelId": v.model_id, "name": v.name, "description": None, "baseModel": v.base_model,
            "baseModelType": "Standard", "air": f"urn:air:sdxl:lora:civitai:{v.model_id}@{v.id}",
            "status": "Published", "availability": "Public", "trainedWords": v.trained_words,
            "stats": {"downloadCount": 1, "thumbsUpCount": 1},
            "model": {"name": m.name, "type": "LORA", "nsfw": False, "poi": False},
            "files": [*v.extra_files, main], "images": [],
            "downloadUrl": f"{self.url}/api/download/models/{v.id}",
        }

    def model_doc(self, m: Model) -> dict:
        versions = sorted((v for v in self.versions.values() if v.model_id == m.id), key=lambda v: -v.id)
        return {
            "id": m.id, "name": m.name, "description": "", "type": "LORA", "poi": False, "nsfw": False,
            "allowNoCredit": m.allow_no_credit, "allowCommercialUse": m.allow_commercial_use,
            "allowDerivatives": m.allow_derivatives, "allowDifferentLicense": m.allow_different_license,
            "stats": {"downloadCount": 1}, "creator": {"username": m.creator, "image": None}, "tags": ["style"],
            "modelVersions": [{k: d[k] for k in ("id", "name", "baseModel", "files", "downloadUrl", "trainedWords")}
                              for d in map(self.version_doc, versions)],
        }

    # ------------------------------------------------------------------ handler

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        auth = h.headers.get("Authorization")
        self.requests.append(("GET", url.path, auth, h.headers.get("Range")))
        if url.path.startswith("/api/v1/"):
            if self.rate_limit > 0:
                self.rate_limit -= 1
                return _send(h, 429, {"error": "Rate limited"}, {"Retry-After": self.retry_after})
            return self._api(h, url.path[len("/api/v1/"):], auth)
        if m := re.fullmatch(r"/api/download/models/(\d+)", url.path):
            v = self.versions.get(int(m.group(1)))
            if v is None:
                return _send(h, 404, {"error": "Model not found"})
            if v.needs_token and auth != f"Bearer {self.token}":
                return _send(h, 401, {"error": "Unauthorized"})
            h.send_response(307)  # civitai.com redirects to a signed storage URL
            h.send_header("Location", f"{self.url}/files/{v.id}/{v.file_name}?X-Signature=abc")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if m := re.fullmatch(r"/files/(\d+)/[^/]+", url.path):
            return self._file(h, self.versions[int(m.group(1))])
        _send(h, 404, {"error": "Not found"})

    def _api(self, h, path: str, auth: Optional[str]) -> None:
        if m := re.fullmatch(r"model-versions/by-hash/([0-9A-Fa-f]+)", path):
            digest = m.group(1).upper()
            for v in self.versions.values():
                hashes = self.version_doc(v)["files"][-1]["hashes"]
                if digest in (hashes["SHA256"], hashes["AutoV2"], hashes["AutoV3"]):
                    return _send(h, 200, self.version_doc(v))
            return _send(h, 404, {"error": "Model not found"})
        if m := re.fullmatch(r"model-versions/(\d+)", path):
            v = self.versions.get(int(m.group(1)))
            if v is None:
                return _send(h, 404, {"error": f"No model version with id {m.group(1)}"})
            if v.needs_token and auth != f"Bearer {self.token}":
                return _send(h, 401, {"error": "Unauthorized"})
            return _send(h, 200, self.version_doc(v))
        if m := re.fullmatch(r"models/(\d+)", path):
            model = self.models.get(int(m.group(1)))
            return _send(h, 200, self.model_doc(model)) if model else _send(h, 404, {"error": "No model"})
        _send(h, 404, {"error": "Not found"})

    def _file(self, h, v: Version) -> None:
        data = bytearray(v.data)
        if v.corrupt:
            data[len(data) // 2] ^= 0xFF
        start = 0
        rng = h.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(m.group(1))
            if start >= len(data):
                return _send(h, 416, {"error": "Range Not Satisfiable"}, {"Content-Range": f"bytes */{len(data)}"})
        body = bytes(data[start:])
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if v.cut_after is not None and v.id not in self._cut_done:
            self._cut_done.add(v.id)
            h.wfile.write(body[: v.cut_after])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)


def _send(h, code: int, doc: dict, headers: Optional[dict] = None) -> None:
    body = json.dumps(doc).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def _tensor_hash(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()
