"""jpaged: an LLM serving engine in JAX/XLA built on PagedAttention."""
from .beam_search import BeamSearchOutput, BeamSearchParams
from .config import EngineConfig
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams



def serve(model=None, host: str = "127.0.0.1", port: int = 8000, **engine_args):
    """OpenAI-compatible HTTP server (blocking); see `jpaged.server.serve`."""
    from .server import serve as _serve  # imported lazily: FastAPI is not needed offline
    return _serve(model, host=host, port=port, **engine_args)


__all__ = ["LLM", "serve", "BeamSearchParams", "BeamSearchOutput", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
