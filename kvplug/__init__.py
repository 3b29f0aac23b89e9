"""kvplug: KV-cache compression and sparse attention for existing LLM engines.

Subpackages: ``kvplug.kernels`` (engine-free kernels), ``kvplug.policies``
(engine-free policies), ``kvplug.integrations`` (vLLM and HF transformers
adapters) and ``kvplug.evals``.  Importing ``kvplug`` has no side effects.
"""

__version__ = "0.1.0"
