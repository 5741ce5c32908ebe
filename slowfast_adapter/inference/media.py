"""Where a request's videos and images come from: a local path, a `file://` URL, a `data:` URL, or (only when the
operator allows it) an `http(s)://` URL; read within limits, with errors that name what the client sent and never a
server path.

`MediaPolicy` holds the operator's rules (which folders local files may come from, byte and frame limits, remote
fetching). `load_media(url, kind, policy)` returns the bytes' digest and a readable path for them; the caller reads the
frames (`read_clip`) or the image from that path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class RequestError(ValueError):
    """A request the server refuses: `status` (4xx), an OpenAI-style `code` and the `param` it is about. The message is
    for the client: it names what the client sent, never a server path."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True)
class MediaPolicy:
    """The operator's rules for the media a request may name."""

    media_roots: tuple[Path, ...] = field(
        default=(), metadata={"help": "Folders local paths and file:// URLs may point into (none: no local files)."}
    )
    allow_remote: bool = field(default=False, metadata={"help": "Fetch http(s):// URLs (off: refused with a 400)."})
    max_bytes: int = field(default=256 * 2**20, metadata={"help": "Largest video or image accepted, in bytes."})
    max_frames: int = field(default=256, metadata={"help": "Most frames a request may ask to read from one video."})
    remote_timeout_s: float = field(default=30.0, metadata={"help": "Seconds allowed to fetch one remote URL."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "media_roots", tuple(Path(root).resolve() for root in self.media_roots))
        if self.max_bytes < 1 or self.max_frames < 1:
            raise ValueError(f"max_bytes and max_frames must be >= 1, got {self.max_bytes} and {self.max_frames}.")


@dataclass
class Media:
    """One video or image of a request: `digest` (SHA-256 of its bytes), `path` readable while the `load_media` context
    is open, `label` how the client named it (for messages)."""

    digest: str
    path: Path
    label: str


def _label(url: str) -> str:
    if url.startswith("data:"):
        return f"{url.split(',', 1)[0][:40]} URL"
    return repr(url if len(url) <= 120 else url[:117] + "...")


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """A SHA-256 digest (hex, the first 16 bytes) of the file's bytes (see `core.encoded.fingerprint` for why not
    BLAKE2)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:32]


def _local(url: str, policy: MediaPolicy, label: str, param: str) -> Path:
    """The file a local path or file:// URL names, refused unless it lies inside one of the policy's media roots."""
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    if not policy.media_roots:
        raise RequestError(
            f"{label}: this server reads no local files (the operator can allow a folder with --media-root); "
            "send the video inline as a data: URL instead.",
            param=param,
        )
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else [root / path for root in policy.media_roots]
    for candidate in candidates:
        resolved = candidate.resolve()  # symlinks and ".." resolved before the check: nothing escapes a root
        if any(resolved.is_relative_to(root) for root in policy.media_roots) and resolved.is_file():
            if resolved.stat().st_size > policy.max_bytes:
                raise RequestError(f"{label} is larger than this server's limit of {policy.max_bytes} bytes.",
                                   status=413, code="media_too_large", param=param)  # fmt: skip
            return resolved
    raise RequestError(f"{label}: no such file in this server's media folders.", status=404, code="media_not_found",
                       param=param)  # fmt: skip


def _decode_data_url(url: str, kind: str, policy: MediaPolicy, label: str, param: str) -> bytes:
    header, _, payload = url.partition(",")
    mime = header[5:].split(";")[0]
    if not header.endswith(";base64"):
        raise RequestError(f"{label}: only base64 data URLs are accepted (data:{kind}/...;base64,...).", param=param)
    if not mime.startswith(f"{kind}/"):
        raise RequestError(f"{label}: a {kind}_url needs a {kind}/* media type, got {mime or 'none'!r}.", param=param)
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise RequestError(f"{label} is larger than this server's limit of {policy.max_bytes} bytes.", status=413,
                           code="media_too_large", param=param)  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{label}: the base64 payload is malformed ({err}).", param=param) from err


def _fetch(url: str, policy: MediaPolicy, label: str, param: str) -> bytes:
    if not policy.allow_remote:
        raise RequestError(
            f"{label}: this server does not fetch http(s) URLs (the operator can enable it with --allow-remote-media); "
            "send the video inline as a data: URL instead.",
            param=param,
        )
    try:
        with urllib.request.urlopen(url, timeout=policy.remote_timeout_s) as response:  # noqa: S310 (operator opt-in)
            data = response.read(policy.max_bytes + 1)
    except OSError as err:
        raise RequestError(f"{label} could not be fetched ({err}).", param=param) from err
    if len(data) > policy.max_bytes:
        raise RequestError(f"{label} is larger than this server's limit of {policy.max_bytes} bytes.", status=413,
                           code="media_too_large", param=param)  # fmt: skip
    return data


@contextmanager
def load_media(url: str, kind: str, policy: MediaPolicy, *, param: str = "messages") -> Iterator[Media]:
    """The video or image (`kind`: 'video' or 'image') that `url` names, readable at `Media.path` inside the context.

    Local paths and file:// URLs are read in place (inside the policy's media roots only); data: and (if allowed)
    http(s) URLs are written to a private temporary file, removed when the context closes."""
    label = f"{kind}_url {_label(url)}"
    scheme = urllib.parse.urlparse(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme in ("", "file"):
        path = _local(url, policy, label, param)
        yield Media(file_digest(path), path, label)
        return
    if scheme == "data":
        data = _decode_data_url(url, kind, policy, label, param)
    elif scheme in ("http", "https"):
        data = _fetch(url, policy, label, param)
    else:
        raise RequestError(f"{label}: unsupported URL scheme {scheme!r} (use data:, file:// or a path).", param=param)
    folder = tempfile.mkdtemp(prefix="slowfast-media-")
    try:
        path = Path(folder) / kind
        path.write_bytes(data)
        yield Media(hashlib.sha256(data).hexdigest()[:32], path, label)  # = file_digest of these bytes
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def hide_path(text: str, path: str | os.PathLike, name: str) -> str:
    """`text` with `path` (as given and resolved) replaced by `name`, and its folder by "<server folder>": what a
    client may see of a message about a server file."""
    path = str(path)
    for form in sorted({path, str(Path(path)), str(Path(path).resolve())}, key=len, reverse=True):
        text = text.replace(form, name)
    for folder in sorted({str(Path(path).parent), str(Path(path).resolve().parent)}, key=len, reverse=True):
        text = text.replace(folder, "<server folder>") if folder not in ("", ".") else text
    return text


def public_message(error: Exception, media: Media) -> str:
    """`error`'s message with the server's path of `media` (and its folder) replaced by how the client named it."""
    return hide_path(str(error), media.path, media.label)
