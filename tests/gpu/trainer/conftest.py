"""The GPU trainer tests share the CPU tests' tiny models and fakes (tests/runtime/trainer)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "runtime", "trainer"))
