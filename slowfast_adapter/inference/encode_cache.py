"""Encoded videos kept between requests: an LRU bounded in bytes.

An entry is what one prompt's videos cost to prepare: their frames (`VideoClip`s, needed again to build the prompt)
and the `EncodedVideos` the model made of them (features, slow K/V, prompt-prefix KV caches). Entries are keyed by
the adapter that encoded them, the frame sampling, and the digests of the videos' bytes; an entry's size is its
frames' bytes plus `EncodedVideos.nbytes`, measured again whenever the entry is used (a new prompt prefix grows it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..core.encoded import EncodedVideos
from .video import VideoClip


@dataclass
class CachedVideos:
    """One prompt's videos: their frames and (once the model has run on them) their encoded form."""

    clips: list[VideoClip]
    encoded: EncodedVideos | None = None

    @property
    def nbytes(self) -> int:
        frames = sum(clip.frames.nbytes for clip in self.clips)
        return frames + (self.encoded.nbytes if self.encoded is not None else 0)


@dataclass
class EncodeCache:
    """LRU of `CachedVideos` whose total `nbytes` stays within `max_bytes` (0: keep nothing).

    `stats`: hits and misses of `get`, entries evicted. Thread-safe; an entry in use may be evicted (the caller keeps
    its reference), it is then simply not found by the next request."""

    max_bytes: int
    stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0, "evictions": 0})
    _entries: OrderedDict[Hashable, CachedVideos] = field(default_factory=OrderedDict)
    _sizes: dict[Hashable, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedVideos | None:
        with self._lock:
            entry = self._entries.get(key)
            self.stats["hits" if entry is not None else "misses"] += 1
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def peek(self, key: Hashable) -> CachedVideos | None:
        """The entry under `key`, if any, without counting a hit or a miss or moving it."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: Hashable, entry: CachedVideos) -> None:
        """Add or re-measure `entry` (most recently used), then drop the least recently used beyond `max_bytes`."""
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._sizes[key] = entry.nbytes
            while self._entries and sum(self._sizes.values()) > self.max_bytes:
                old, _ = self._entries.popitem(last=False)
                del self._sizes[old]
                self.stats["evictions"] += 1
