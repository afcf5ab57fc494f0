"""`vllm-gateway plan`: how to set `--gpu-memory-utilization` when vLLM servers share GPUs.

Pure Python on the stdlib; it never imports vLLM. It follows vLLM 0.32's own accounting
(each module names the vLLM file and function it mirrors):

- sizes.py, gpus.py: byte sizes, and GPUs by size or by name (cudaMemGetInfo totals);
- locate.py, architecture.py: a model's config.json (local or already in the Hugging Face
  cache, nothing downloaded) read into the shapes vLLM uses;
- weights.py: the weight bytes each tensor-parallel rank holds, read from safetensors headers
  or computed from the config;
- kv.py: KV bytes per token per layer, layer groups, blocks, and what a budget buys;
- overheads.py: the measured overheads, each with a default, its source, and an override;
- budget.py: one instance's budget, KV cache and startup free-memory check;
- placement.py: which instance goes where, each one's utilization, the start order, and
  what would make an overflowing plan fit;
- request.py, command.py, render.py: the command line and its text, JSON and script output.
"""
