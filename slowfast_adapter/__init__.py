"""slowfast-adapter: retrofit the slow-fast architecture onto Hugging Face video MLLMs."""

__version__ = "0.1.0"

from .adapter_io import AdapterError  # noqa: E402
from .config import SlowFastConfig  # noqa: E402
from .model import SlowFastModel, wrap  # noqa: E402

__all__ = ["AdapterError", "SlowFastConfig", "SlowFastModel", "__version__", "wrap"]
