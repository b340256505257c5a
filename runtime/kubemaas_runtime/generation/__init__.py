"""Text generation: causal LMs (transformers directories and GGUF files) served with continuous
batching behind the OpenAI API and the KServe v2 generate extension (docs/runtime.md)."""
