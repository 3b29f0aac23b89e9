"""Engine adapters: vLLM (``kvplug.integrations.vllm``) and HF transformers."""
