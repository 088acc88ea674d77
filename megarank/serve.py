"""``megarank serve``: the rerank API over a megarank checkpoint, run directory or HF export.

    megarank serve --model DIR [--host 127.0.0.1 --port 8000 --api-key KEY
                   --max-batch-tokens 16384 --max-wait-ms 5 --max-documents 1000
                   --max-text-chars 100000 --max-body-mb 16 --max-length N] [overrides]

POST /v1/rerank, /v2/rerank and /rerank take {model, query, documents, top_n, return_documents}
(Cohere, Jina and vLLM shapes); /rerank also takes Text Embeddings Inference's {query, texts,
raw_scores, return_text} and answers with TEI's list of {index, score[, text]}; POST /score
takes vLLM's {text_1, text_2}; GET /health and GET /v1/models describe the server.

On a network: --api-key (or MEGARANK_API_KEY) makes every route but /health want
"Authorization: Bearer KEY" (401 otherwise). Requests are bounded: --max-documents documents
(pairs), --max-text-chars characters per text, --max-body-mb per body; each bound refuses with
413 naming the field. The model's scoring.json decides tokenization, template,
truncation and head, as for ``megarank score``; a model whose config disagrees with it is
refused at start.

One process serves one model copy: a scoring thread owns the model and batches concurrent
requests (up to --max-batch-tokens padded tokens a forward pass, waiting up to --max-wait-ms
for company). torch uses --threads intra-op threads (default: every core this process may use).
For several model copies on a many-core machine, run one server per copy (each with
--threads cores/copies) behind a load balancer. SIGTERM or Ctrl-C stops taking connections,
answers the requests in flight, then exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megarank serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="a megarank checkpoint, a run directory (its latest) or an HF export")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--max-batch-tokens", type=int, default=16384,
                    help="padded tokens per forward pass (rows x longest row)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="how long a request waits for others to share its forward pass")
    ap.add_argument("--max-documents", type=int, default=1000,
                    help="documents per rerank request, pairs per score request; more: 413")
    ap.add_argument("--max-length", type=int, default=None,
                    help="cut sequences shorter than the scoring contract's max_length")
    ap.add_argument("--max-text-chars", type=int, default=100_000,
                    help="characters per text (query or document); longer: 413")
    ap.add_argument("--max-body-mb", type=float, default=16.0,
                    help="request body size limit; larger: 413")
    ap.add_argument("--api-key", default=os.environ.get("MEGARANK_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health "
                         "(default: the MEGARANK_API_KEY environment variable; none: open)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: the cores this process may use)")
    ap.add_argument("--workers", type=int, default=1,
                    help="model copies in this process: 1 (run one server per copy for more)")
    ap.add_argument("--served-model-name", default=None,
                    help="the name /v1/models and responses give (default: the model folder)")
    ap.add_argument("--relevance-score", default="raw", choices=("raw", "sigmoid"),
                    help="relevance_score as the model's raw score or its sigmoid")
    ap.add_argument("--shutdown-timeout", type=float, default=300.0,
                    help="seconds in-flight requests get to finish after SIGTERM")
    ap.add_argument("--log-level", default="info",
                    choices=("critical", "error", "warning", "info", "debug"))
    ap.add_argument("--access-log", action="store_true", help="log every request")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.precision=bf16")
    return ap


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def startup_line(info: dict, url: str, api_key: bool = False) -> str:
    """The line printed once the model is loaded and the socket listens."""
    cut = (f"max_length {info['max_length']}" if info["max_length"] == info["contract_max_length"]
           else f"max_length {info['max_length']} (contract {info['contract_max_length']})")
    return (f"megarank serve: {info['model']} ({info['source']}): {info['family']}, head "
            f"{info['head']}, pooling {info['pooling']}, {cut}, relevance_score "
            f"{info['relevance_score']} | device {info['device']}, {info['precision']}, "
            f"{info['threads']} torch threads, 1 worker | batches <= {info['max_batch_tokens']} "
            f"tokens, wait <= {info['max_wait_ms']:g} ms, <= {info['max_documents']} documents, "
            f"<= {info['max_text_chars']} characters a text, body <= {info['max_body_bytes']} "
            f"bytes | {'API key required' if api_key else 'no API key'} | listening on {url}")


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank serve`` / ``python -m megarank.serve``)."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.workers != 1:
        ap.error(f"--workers {args.workers}: a server process holds one model copy and batches "
                 "every request on it; for more copies run one server per copy (e.g. "
                 "--threads cores/copies each, on its own --port) behind a load balancer")
    for name in ("max_batch_tokens", "max_documents", "max_text_chars", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        ap.error("--max-wait-ms must be >= 0 and --max-body-mb > 0")

    from megarank.api import ServeLimits, for_command, open_engine, serve_app

    limits = ServeLimits(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                         max_documents=args.max_documents, max_text_chars=args.max_text_chars,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    try:
        engine = open_engine(args.model, args.overrides,
                             device=None if args.device == "auto" else args.device,
                             threads=args.threads, limits=limits, max_length=args.max_length,
                             relevance=args.relevance_score, name=args.served_model_name)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"megarank serve: cannot serve {args.model}: {for_command(e)}", file=sys.stderr,
              flush=True)
        raise SystemExit(1) from None
    try:
        import uvicorn

        engine.warm_up()
        sock = _listen(args.host, args.port)
        host, port = sock.getsockname()[:2]
        url = f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else \
            f"http://{host}:{port}"
        print(startup_line(engine.info(), url, bool(args.api_key)), file=sys.stderr, flush=True)
        config = uvicorn.Config(serve_app(engine, api_key=args.api_key), log_level=args.log_level,
                                access_log=args.access_log, lifespan="on",
                                timeout_graceful_shutdown=args.shutdown_timeout)
        # uvicorn handles SIGTERM/SIGINT while it runs (stop accepting, finish in-flight
        # requests) and re-raises the signal once done: that re-raise must end the process
        # through this function's cleanup with status 0, not kill it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        uvicorn.Server(config).run(sockets=[sock])
        stats = engine.batcher.stats
        print(f"megarank serve: stopped after {stats.requests} requests, {stats.pairs} pairs, "
              f"{stats.forward_passes} forward passes", file=sys.stderr, flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
