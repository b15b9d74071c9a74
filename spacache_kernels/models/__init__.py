"""Model adapters (LLaDA, Dream, Llama-family) and the cached-step runtime."""
