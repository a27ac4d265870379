"""An app whose import takes a while (a big framework, a model loading)."""

import os
import time

time.sleep(float(os.environ.get("SLOWBOOT_SECONDS", "2")))

from tests.apps.handlers import pid as handler  # noqa: E402, F401
