"""A Hub model read to the level of its headers: configs and indexes downloaded, safetensors headers
read with HTTP range requests (two small reads a file), never the weights.

Offline (``HF_HUB_OFFLINE=1``) the weight files must already be in huggingface_hub's cache; their
headers are read from there.
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING

from ..errors import InputError
from . import hub_endpoint, is_offline, translate_errors
from .pull import _PICKLES, _download, _list_files

if TYPE_CHECKING:  # pragma: no cover
    from ..registry.model_files import ModelFiles
    from ..weights import ModelRef

#: a safetensors header larger than this is not a header (the format caps it at 100 MB)
_MAX_HEADER = 100 * 2**20


def _remote_header(url: str, headers: dict) -> dict[str, tuple[int, ...]]:
    from huggingface_hub import get_session

    session = get_session()

    def get(start: int, stop: int) -> bytes:
        r = session.get(url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"}, follow_redirects=True)
        r.raise_for_status()
        return r.content[: stop - start]

    (n,) = struct.unpack("<Q", get(0, 8))
    if not 0 < n <= _MAX_HEADER:
        raise InputError(f"{url}: not a safetensors file (header length {n})")
    doc = json.loads(get(8, 8 + n))
    return {k: tuple(v["shape"]) for k, v in doc.items() if k != "__metadata__"}


def read_hub_model(ref: "ModelRef") -> "ModelFiles":
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from ..registry.model_files import INDEX_FILES, FolderTensors, ModelFiles, read_local, role_of_folder, weight_files_in

    where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    endpoint = hub_endpoint()
    offline = is_offline()
    sub = (ref.repo_path or "").strip("/")
    with translate_errors("reading", where, endpoint=endpoint, offline=offline):
        names, cached_only = _list_files(ref.repo_id, "model", ref.revision, endpoint=endpoint, token=None, offline=offline)
        if sub:
            if sub.endswith(_PICKLES):
                raise InputError(f"{where}: {sub} is a pickle checkpoint (lorareg never unpickles)")
            names = [n[len(sub) + 1:] for n in names if n.startswith(sub + "/")] if sub not in names else [sub]
            if not names:
                raise InputError(f"{where}: no file or folder {sub!r} in the repo")
        base = sub + "/" if sub and not sub.endswith(".safetensors") else ""
        folders_of: dict[str, list[str]] = {}
        for n in names:
            folder, _, fname = n.rpartition("/")
            folders_of.setdefault(folder, []).append(fname)
        if sub.endswith(".safetensors"):
            plan = {"": [sub]}
            kind = "single_file"
        else:
            plan = {f: weight_files_in(files) for f, files in folders_of.items() if "/" not in f and role_of_folder(f)}
            plan = {f: w for f, w in plan.items() if w}
            kind = "diffusers" if plan and ("model_index.json" in folders_of.get("", []) or not weight_files_in(folders_of.get("", []))) else "transformers"
            if kind == "transformers":
                plan = {"": weight_files_in(folders_of.get("", []))}
            if not any(plan.values()):
                pickles = any(n.endswith(_PICKLES) for n in names)
                raise InputError(f"{where}: no .safetensors weights found" + (" (only pickle files, which lorareg never reads)" if pickles else ""))
        small = [f"{f}/{name}".lstrip("/") for f in plan for name in ("config.json",) if name in folders_of.get(f, [])]
        small += [f"{f}/{w}".lstrip("/") for f, ws in plan.items() for w in ws if w.endswith(INDEX_FILES)]
        if "model_index.json" in folders_of.get("", []):
            small.append("model_index.json")
        if offline or cached_only:
            # no range requests offline: the weight files themselves must be cached
            small += [f"{f}/{w}".lstrip("/") for f, ws in plan.items() for w in ws if not w.endswith(INDEX_FILES)]
        small = [base + s for s in small]
        folder = _download(ref.repo_id, "model", ref.revision, small or [base + "config.json"], endpoint=endpoint, token=None,
                           offline=cached_only)
        root = folder / sub if sub else folder
        if offline or cached_only:
            files = read_local(root, ref.text)
            files.repo_id, files.local = ref.repo_id, root
            return files
        http_headers = build_hf_headers(token=None)
        out: dict[str, FolderTensors] = {}
        for f, ws in plan.items():
            local = root.parent if kind == "single_file" else (root / f if f else root)
            shards = ws
            if ws and ws[0].endswith(INDEX_FILES):
                doc = json.loads((local / ws[0]).read_text(encoding="utf-8"))
                shards = sorted(set(doc.get("weight_map", {}).values()))
            tensors: dict[str, tuple[int, ...]] = {}
            for shard in shards:
                path_in_repo = shard if kind == "single_file" else base + (f"{f}/{shard}" if f else shard)
                url = hf_hub_url(ref.repo_id, path_in_repo, revision=ref.revision, endpoint=endpoint)
                tensors.update(_remote_header(url, http_headers))
            cfg_path = local / "config.json"
            config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
            out[f] = FolderTensors(tensors, config, [f"{f}/{s}".lstrip("/") for s in shards])
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8")) if kind == "diffusers" and index_path.is_file() else {}
    return ModelFiles(ref.text, kind, out, model_index=index, repo_id=ref.repo_id, local=None)
