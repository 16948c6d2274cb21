"""The loading-optimized checkpoint format (ServerlessLLM-style) and its fast reader."""
