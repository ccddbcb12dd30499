"""The GPU optimizer tests share the CPU tests' tiny models and checks (tests/runtime/optim)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "runtime", "optim"))
