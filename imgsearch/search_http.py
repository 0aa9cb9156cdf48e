"""``imgsearch search`` beside a running ``imgsearch up``: ask its API.

The embedded store serves one process, the ``up``; opening it here would fail. The answer
has the same shape as a search against the store (query, took_ms, hits).
"""

from __future__ import annotations

import mimetypes
import os
import time
from pathlib import Path
from typing import Any

import click
import httpx

TIMEOUT_S = 60.0


def search_running(api_url: str, image: Path, limit: int,
                   filters: tuple[str, ...]) -> dict[str, Any]:
    params: list[tuple[str, str | int]] = [("limit", min(limit, 100))]
    params += [("filter", f) for f in filters]
    key = os.environ.get("IMGSEARCH_API_KEY")
    headers = {"Content-Type": mimetypes.guess_type(image.name)[0] or "image/jpeg"}
    if key:
        headers["X-API-Key"] = key
    started = time.perf_counter()
    try:
        response = httpx.post(f"{api_url}/search", params=params, content=image.read_bytes(),
                              headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"the running `imgsearch up` at {api_url} did not answer: "
                                   f"{exc}") from exc
    if response.status_code != 200:
        try:
            error = response.json()["error"]
            text = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            text = response.text[:300]
        hint = " (set IMGSEARCH_API_KEY)" if response.status_code == 401 else ""
        raise click.ClickException(f"{image}: {text}{hint}")
    body = response.json()
    return {
        "query": str(image),
        "took_ms": round((time.perf_counter() - started) * 1000, 1),
        "served_by": api_url,
        "hits": [
            {"image_id": h["image_id"], "score": round(h["score"], 6), "uri": h.get("uri"),
             "metadata": h.get("metadata") or {}}
            for h in body["hits"]
        ],
    }
