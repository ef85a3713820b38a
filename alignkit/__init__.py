"""alignkit: align LLMs with negative responses."""
