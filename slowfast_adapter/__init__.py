"""slowfast-adapter: retrofit the slow-fast architecture onto Hugging Face video MLLMs.

The public names load on first use (PEP 562), so `import slowfast_adapter` and `slowfast-adapter --help` stay
light: torch and transformers are imported when a model class or config is first touched.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .config import SlowFastConfig
    from .core.encoded import EncodedVideos
    from .core.frame_attention import FrameAttention, looking, where_it_looked
    from .io.files import AdapterError
    from .model import SlowFastModel, wrap

_EXPORTS = {
    "AdapterError": ".io.files",
    "EncodedVideos": ".core.encoded",
    "FrameAttention": ".core.frame_attention",
    "SlowFastConfig": ".config",
    "SlowFastModel": ".model",
    "looking": ".core.frame_attention",
    "where_it_looked": ".core.frame_attention",
    "wrap": ".model",
}
__all__ = [
    "AdapterError",
    "EncodedVideos",
    "FrameAttention",
    "SlowFastConfig",
    "SlowFastModel",
    "__version__",
    "looking",
    "where_it_looked",
    "wrap",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
