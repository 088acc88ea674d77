"""A server that can face a network: the API key, the request bounds (413 naming the field),
and Text Embeddings Inference's request shape on /rerank. The app runs in this process over a
real engine (all-MiniLM-L6-v2 imported as a cross-encoder checkpoint), served by uvicorn on a
local port from a thread, and is called over HTTP with httpx and the official cohere client."""

from __future__ import annotations

import math
import socket
import threading

import cohere
import httpx
import pytest
import uvicorn

from megarank.serve import _parser
from megarank.serving.app import create_app
from megarank.serving.engine import RerankEngine, ServeLimits

KEY = "s3cret-key"
DOCS = ["A wing is a lifting surface.", "Bananas are yellow.", "Flutter of a thin wing panel."]
QUERY = "what is wing flutter?"


@pytest.fixture(scope="module")
def engine(minilm):
    eng = RerankEngine.load(minilm["imported"], device="cpu",
                            limits=ServeLimits(max_documents=4, max_text_chars=200))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=KEY), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=120) as c:
        while not server.started:
            threading.Event().wait(0.02)
        yield c
    server.should_exit = True
    thread.join(60)


AUTH = {"Authorization": f"Bearer {KEY}"}


def _rerank(client, body, path="/v2/rerank", headers=AUTH):
    return client.post(path, json=body, headers=headers)


def test_without_the_key_only_health_answers(client):
    body = {"query": QUERY, "documents": DOCS}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path, payload in (("post", "/v2/rerank", body), ("post", "/rerank", body),
                                      ("post", "/score", {"text_1": "a", "text_2": ["b"]}),
                                      ("get", "/v1/models", None)):
            r = client.request(method, path, json=payload, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["param"] == "Authorization" and r.json()["code"] == 401
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200
    r = _rerank(client, body)
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_the_cohere_client_sends_the_key(client):
    co = cohere.ClientV2(api_key=KEY, base_url=str(client.base_url), httpx_client=client)
    got = co.rerank(model="m", query=QUERY, documents=DOCS)
    want = _rerank(client, {"query": QUERY, "documents": DOCS}).json()["results"]
    assert [(r.index, r.relevance_score) for r in got.results] == \
        [(r["index"], r["relevance_score"]) for r in want]
    wrong = cohere.ClientV2(api_key="wrong", base_url=str(client.base_url), httpx_client=client)
    with pytest.raises(cohere.errors.UnauthorizedError):
        wrong.rerank(model="m", query=QUERY, documents=DOCS)


@pytest.mark.parametrize("path, body, param", [
    ("/v2/rerank", {"query": QUERY, "documents": DOCS * 2}, "documents"),
    ("/v2/rerank", {"query": QUERY, "documents": ["short", "x" * 201]}, "documents[1]"),
    ("/v1/rerank", {"query": "q" * 201, "documents": ["short"]}, "query"),
    ("/rerank", {"query": QUERY, "texts": ["ok", "ok", "y" * 300]}, "texts[2]"),
    ("/rerank", {"query": QUERY, "texts": DOCS * 2}, "texts"),
    ("/score", {"text_1": "a", "text_2": ["b", "z" * 201]}, "text_2[1]"),
    ("/score", {"text_1": "q" * 201, "text_2": ["b"]}, "text_1"),
])
def test_each_bound_is_a_413_naming_the_field(client, path, body, param):
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code == 413, r.text
    error = r.json()
    assert error["param"] == param and error["message"].startswith(f"{param}:"), error
    assert ("max_documents" if param in ("documents", "texts") else "max_text_chars") \
        in error["message"]
    assert _rerank(client, {"query": QUERY, "documents": DOCS}).status_code == 200


def test_help_names_every_bound():
    text = _parser().format_help()
    for flag in ("--api-key", "MEGARANK_API_KEY", "--max-documents", "--max-text-chars",
                 "--max-body-mb", "413"):
        assert flag in text, flag


def test_text_embeddings_inference_shape(client):
    cohere_shape = _rerank(client, {"query": QUERY, "documents": DOCS}).json()["results"]
    raw = {r["index"]: r["relevance_score"] for r in cohere_shape}  # the server's default: raw
    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS}, headers=AUTH)
    assert r.status_code == 200, r.text
    items = r.json()
    assert isinstance(items, list) and sorted(i["index"] for i in items) == [0, 1, 2]
    assert all(set(i) == {"index", "score"} for i in items)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)  # best first, as TEI answers
    for item in items:  # TEI's default: the sigmoid of the model's score
        assert item["score"] == pytest.approx(1 / (1 + math.exp(-raw[item["index"]])), rel=1e-6)
    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True,
                                     "return_text": True, "truncate": True}, headers=AUTH)
    for item in r.json():
        assert item["score"] == pytest.approx(raw[item["index"]], rel=1e-6)
        assert item["text"] == DOCS[item["index"]]
    bad = client.post("/rerank", json={"query": QUERY, "texts": ["a", ""]}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["param"] == "texts[1]"
    left = client.post("/rerank", json={"query": QUERY, "texts": ["a"],
                                        "truncation_direction": "Left"}, headers=AUTH)
    assert left.status_code == 400 and left.json()["param"] == "truncation_direction"
    # The vLLM shape on the same path is unchanged, and a body that is neither says what is
    # missing.
    plain = client.post("/rerank", json={"query": QUERY, "documents": DOCS}, headers=AUTH)
    assert plain.json()["results"] == cohere_shape
    neither = client.post("/rerank", json={"query": QUERY}, headers=AUTH)
    assert neither.status_code == 400 and neither.json()["param"] == "documents"
    broken = client.post("/rerank", content=b'{"query": "a", "texts": [', headers={
        **AUTH, "content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["param"] == "body"


def test_requests_are_answered_in_arrival_order(engine):
    """Six-document requests of long documents and one-document requests of a few words
    alternate, tokenized by four threads (so the short ones are ready first) and batched
    together: every request is still answered after every request that arrived before it, with
    the scores it gets on its own."""
    import asyncio

    from megarank.serving.batcher import DynamicBatcher

    long_doc = " ".join(["the flutter of a thin wing panel in supersonic flow"] * 12)
    requests = [[(QUERY, f"{i} {long_doc}")] * 6 if i % 2 == 0 else [(QUERY, f"short {i}")]
                for i in range(8)]
    batcher = DynamicBatcher(engine._score, engine.collator.encode_pairs,
                             pad_id=engine.collator.pad_id,
                             pad_to_multiple_of=engine.collator.pad_to_multiple_of,
                             max_batch_tokens=4096, max_wait_ms=50, tokenizer_threads=4)
    batcher.start()
    try:
        async def arrive_together():
            answered = []

            async def one(i):
                scores, _ = await batcher.submit(requests[i])
                answered.append(i)
                return scores

            tasks = [asyncio.create_task(one(i)) for i in range(len(requests))]
            return await asyncio.gather(*tasks), answered

        together, order = asyncio.run(arrive_together())

        async def one_by_one():
            return [(await batcher.submit(r))[0] for r in requests]

        alone = asyncio.run(one_by_one())
    finally:
        batcher.stop()
    assert order == list(range(len(requests)))
    assert batcher.stats.max_requests_per_pass > 1  # they did share forward passes
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
