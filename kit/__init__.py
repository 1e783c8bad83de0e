"""llama.cpp tuning kit: measure which settings make a model faster on your hardware, and what they cost.

The public surface most notebooks need is re-exported here; see each module for the rest.
"""
__version__ = "0.1.0"

from kit.config import Settings, SettingsError  # noqa: E402
from kit.models import ModelFileError, model_card, resolve_model  # noqa: E402
from kit.measure import Test, pp, tg, e2e  # noqa: E402
from kit.results import load_results  # noqa: E402

__all__ = [
    "Settings", "SettingsError", "ModelFileError", "model_card", "resolve_model",
    "Test", "pp", "tg", "e2e", "load_results", "__version__",
]
