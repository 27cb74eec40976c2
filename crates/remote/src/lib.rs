//! OpenAI-compatible remote engines (vLLM, SGLang, Ollama, LM Studio, llama.cpp server) as reasoners.
