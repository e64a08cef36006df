"""What programs call: `LLM` (the batch API) and the OpenAI-compatible server (`openai/`)."""
