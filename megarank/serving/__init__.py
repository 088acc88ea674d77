"""Serving a trained reranker: the rerank API (Cohere/Jina/vLLM shapes) over one model.

- :mod:`megarank.serving.engine`: the model, loaded with :func:`megarank.api.load_scorer` and
  scored by its scoring contract, behind the batcher.
- :mod:`megarank.serving.batcher`: dynamic batching on one scoring thread.
- :mod:`megarank.serving.schemas`: request and response bodies (pydantic).
- :mod:`megarank.serving.app`: the FastAPI application.

``megarank serve`` (:mod:`megarank.serve`) runs it under uvicorn.
"""
