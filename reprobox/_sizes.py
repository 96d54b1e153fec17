"""The size of each locked wheel, read at lock time, so a download can stop at the expected size.

pip's report carries no size. A `file://` wheel is measured with `stat`; an http(s) wheel with
a HEAD request (its `Content-Length`, redirects followed, no content encoding), which PyPI's
file host and plain web servers answer alike, where PEP 691 JSON would be a second format per
index (PyPI has it; local file indexes and PyTorch's pages do not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from reprobox.errors import IndexUnreachableError

__all__ = ["Head", "wheel_sizes"]

#: One HEAD request: (url, verify) -> (status code, Content-Length header or None).
Head = Callable[[str, "bool | str"], tuple[int, str | None]]

_WORKERS = 8
_TIMEOUT_S = 60


def _head(url: str, verify: bool | str) -> tuple[int, str | None]:
    response = requests.head(
        url,
        allow_redirects=True,
        timeout=_TIMEOUT_S,
        verify=verify,
        headers={"Accept-Encoding": "identity"},
    )
    return response.status_code, response.headers.get("Content-Length")


def _file_size(url: str) -> int:
    path = Path(unquote(urlsplit(url).path))
    try:
        return path.stat().st_size
    except OSError as exc:
        raise IndexUnreachableError(
            f"the locked wheel {url} cannot be read: {exc.strerror}",
            hint="the folder or file index it came from changed while locking; lock again",
        ) from None


def _http_size(url: str, verify: bool | str, head: Head) -> int | None:
    try:
        status, length = head(url, verify)
    except requests.RequestException as exc:
        raise IndexUnreachableError(
            f"could not read the size of {url}: {type(exc).__name__}",
            hint="check the network; the lock records each wheel's size so downloads stop there",
        ) from None
    if status in {401, 403}:
        return None  # an index that wants credentials: the size stays unknown, not guessed
    if status >= 400:
        raise IndexUnreachableError(
            f"{url} answered HTTP {status} when asked for its size; the index changed while locking",
            hint="lock again",
        )
    if length is None or not length.isdecimal():
        return None
    return int(length)


def wheel_sizes(
    urls: Iterable[str],
    *,
    verify: bool | str = True,
    head: Head = _head,
    on_note: Callable[[str], None] | None = None,
) -> Mapping[str, int | None]:
    """`url -> size in bytes` (None where the server would not say) for every wheel URL."""
    wanted = sorted(set(urls))
    sizes: dict[str, int | None] = {
        url: _file_size(url) for url in wanted if urlsplit(url).scheme == "file"
    }
    remote = [url for url in wanted if url not in sizes]
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        found = pool.map(lambda url: _http_size(url, verify, head), remote)
        sizes.update(zip(remote, found, strict=True))
    unknown = [url for url in remote if sizes[url] is None]
    if unknown and on_note is not None:
        on_note(f"no size known for {len(unknown)} wheel(s), e.g. {unknown[0]}")
    return sizes
