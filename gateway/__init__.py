"""vllm-gateway: one OpenAI-compatible endpoint in front of many vLLM servers."""

from __future__ import annotations

__version__ = "0.1.0"
