"""Read snapshots on local paths, shared mounts or storage URIs (``s3://``, ``gs://``) alike.

Ray Train writes checkpoints under ``ray.storage_path``; on a multi-node cluster that is shared
storage, often an object store. These helpers go through ``pyarrow.fs`` so the pipeline and the
extraction actors read snapshots the same way wherever they live.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pyarrow.fs as pafs
import torch


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in path:
        path = os.path.abspath(path)
    return pafs.FileSystem.from_uri(path)


def join(base: str, *parts: str) -> str:
    """``parts`` appended to the path of ``base`` (a local path or a URI): a URI's query (e.g.
    ``s3://bucket/runs?endpoint_override=host:9000``) stays at the end, and ``file:///`` keeps
    its root."""
    if "://" not in base:
        return "/".join([base.rstrip("/"), *parts])
    head, sep, query = base.partition("?")  # the rest of the URI is kept as written
    head = head.rstrip("/")
    if head.endswith(":/"):  # a bare root, e.g. file:/// stripped to file:
        head += "/"
    elif head.endswith(":"):
        head += "//"
    return "/".join([head, *parts]) + sep + query


def exists(path: str) -> bool:
    fs, p = _resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, p = _resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def torch_load(path: str, **kwargs: Any) -> Any:
    """``torch.load(..., weights_only=True)`` of a file on any filesystem."""
    return torch.load(io.BytesIO(read_bytes(path)), weights_only=True, **kwargs)


def list_dirs(path: str, *, prefix: str) -> list[str]:
    """Sub-directories of ``path`` whose name starts with ``prefix`` (same scheme as ``path``)."""
    fs, p = _resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))
    return [join(path, n) for n in names]


def file_sizes(path: str) -> dict[str, int]:
    """Name -> size in bytes of each file directly in the folder ``path`` (one listing, also on a
    storage URI); {} where there is no such folder."""
    fs, p = _resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}
