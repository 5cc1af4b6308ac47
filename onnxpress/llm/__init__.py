"""Causal LMs with a KV cache: import to an onnxruntime-genai folder (``export``), KV-cache aware feeds from
token ids (``kv``), and the LLM task: perplexity and greedy-generation agreement (``task``)."""
