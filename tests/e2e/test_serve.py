"""``megarank serve`` as a real process, called over HTTP: the rerank API RAG stacks call.

all-MiniLM-L6-v2 (imported and exported as a cross-encoder) and a tiny random Qwen3 with the
yes/no head are served; their scores must equal ``megarank score`` on the same pairs, through
our own HTTP calls and through the official ``cohere`` client. 32 concurrent clients must each
get their own result, bad input must get a 4xx naming the field while the server keeps serving,
a model failure must be a 500 for its request only, and SIGTERM must let a request in flight
finish. One MiniLM server is shared by the module.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cohere
import httpx
import pytest

import megarank
from tests.helpers.artefacts import score_pairs, torch_threads
from tests.helpers.hf_tiny import save_tiny
from tests.helpers.runs import run_cli
from tests.helpers.serve import ServerProcess, cranfield_requests, wait_for

MAX_DOCS = 64
BODY_LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def models(minilm, tmp_path_factory) -> dict[str, Path]:
    """all-MiniLM-L6-v2 exported as a cross-encoder (the session's import and export); a tiny
    Qwen3 yes/no checkpoint and its export."""
    root = tmp_path_factory.mktemp("serve-models")
    lm = save_tiny("qwen3", root, causal_lm=True)
    qwen_ckpt = megarank.convert_from_hf(lm, root / "qwen3_yes_no_ckpt", ["pair.head=yes_no"])
    qwen = megarank.convert_to_hf(qwen_ckpt, root / "qwen3_yes_no")
    return {"minilm": minilm["export"], "qwen3": qwen, "qwen3_ckpt": qwen_ckpt}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    srv = ServerProcess(models["minilm"], tmp_path_factory.mktemp("serve-cwd"),
                        ["--max-documents", MAX_DOCS, "--max-body-mb", BODY_LIMIT_MB,
                         "--max-wait-ms", 20, "--served-model-name", "minilm-reranker"]).start()
    yield srv
    srv.stop()


def rerank(url: str, query: str, docs: list, path: str = "/v2/rerank", **extra) -> dict:
    r = httpx.post(url + path, json={"model": "minilm-reranker", "query": query,
                                     "documents": docs, **extra}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def by_index(response: dict) -> list[float]:
    """The scores of a rerank response in the order of the request's documents."""
    scores = {r["index"]: r["relevance_score"] for r in response["results"]}
    return [scores[i] for i in range(len(scores))]


def assert_close(got: list[float], want: list[float], atol: float = 1e-5) -> None:
    assert len(got) == len(want)
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= atol, f"max |served - megarank score| = {worst:.3g}"


def test_startup_line_and_model_endpoints(server):
    line = next(x for x in server.lines if x.startswith("megarank serve:"))
    for part in ("minilm-reranker", "bert, head classifier, pooling cls", "max_length 128",
                 "device cpu", "2 torch threads", "1 worker", "batches <= 16384 tokens",
                 "wait <= 20 ms", f"<= {MAX_DOCS} documents"):
        assert part in line, line
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["head"] == "classifier"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["minilm-reranker"]
    assert models["data"][0]["max_model_len"] == 128


def test_scores_equal_megarank_score(server, models, tmp_path):
    requests = cranfield_requests(6, 10, words=60)
    pairs = [(q, d) for q, docs in requests for d in docs]
    want = score_pairs(models["minilm"], pairs, tmp_path)
    assert max(want) - min(want) > 1e-3  # distinct scores, so an order or a mix-up shows
    got = []
    for q, docs in requests:
        response = rerank(server.url, q, docs)
        assert response["model"] == "minilm-reranker"
        ranked = [r["relevance_score"] for r in response["results"]]
        assert ranked == sorted(ranked, reverse=True)
        assert response["meta"]["tokens"]["input_tokens"] == response["usage"]["total_tokens"] > 0
        got += by_index(response)
    assert_close(got, want)
    # vLLM's /score: one query against a list, and zipped lists.
    q, docs = requests[0]
    r = httpx.post(server.url + "/score", json={"text_1": q, "text_2": docs}).json()
    assert_close([d["score"] for d in r["data"]], want[:len(docs)])
    r = httpx.post(server.url + "/score",
                   json={"text_1": [p[0] for p in pairs], "text_2": [p[1] for p in pairs]}).json()
    assert [d["index"] for d in r["data"]] == list(range(len(pairs)))
    assert_close([d["score"] for d in r["data"]], want)
    # top_n, return_documents, {"text": ...} documents, and the v1 path
    full = rerank(server.url, q, docs)
    top = rerank(server.url, q, [{"text": d} for d in docs], "/v1/rerank", top_n=3,
                 return_documents=True)
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:3]]
    assert [r["document"]["text"] for r in top["results"]] == [
        docs[r["index"]] for r in top["results"]]
    assert "document" not in full["results"][0]
    assert len(rerank(server.url, q, docs, "/rerank", top_n=1000)["results"]) == len(docs)


def test_official_cohere_client(server, models, tmp_path):
    q, docs = cranfield_requests(3, 8, words=60)[2]
    want = score_pairs(models["minilm"], [(q, d) for d in docs], tmp_path)
    order = sorted(range(len(docs)), key=lambda i: -want[i])

    co = cohere.ClientV2(api_key="not-checked", base_url=server.url)
    response = co.rerank(model="minilm-reranker", query=q, documents=docs, top_n=3)
    assert [r.index for r in response.results] == order[:3]
    for r in response.results:
        assert abs(r.relevance_score - want[r.index]) <= 1e-5

    v1 = cohere.Client(api_key="not-checked", base_url=server.url)
    response = v1.rerank(model="minilm-reranker", query=q, documents=docs, top_n=2,
                         return_documents=True)
    assert [r.index for r in response.results] == order[:2]
    assert [r.document.text for r in response.results] == [docs[i] for i in order[:2]]


def test_32_concurrent_clients_each_get_their_own_result(server):
    requests = cranfield_requests(32, 20)
    assert len({len(d) for _, d in requests}) > 10 and len({q for q, _ in requests}) == 32
    alone = [by_index(rerank(server.url, q, docs)) for q, docs in requests]
    before = httpx.get(server.url + "/health").json()["batching"]
    barrier = threading.Barrier(len(requests))

    def client(i: int) -> list[float]:
        q, docs = requests[i]
        with httpx.Client(timeout=300) as c:
            barrier.wait()
            r = c.post(server.url + "/v2/rerank", json={"query": q, "documents": docs})
        assert r.status_code == 200, r.text
        return by_index(r.json())

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(client, range(len(requests))))
    for i, (mine, single) in enumerate(zip(together, alone, strict=True)):
        assert len(mine) == len(requests[i][1])
        assert_close(mine, single)
    after = httpx.get(server.url + "/health").json()["batching"]
    assert after["requests"] - before["requests"] == 32  # none lost, none doubled
    assert after["pairs"] - before["pairs"] == sum(len(d) for _, d in requests)
    # They were scored together: forward passes held rows of several requests.
    assert after["max_requests_per_pass"] > 1
    assert after["forward_passes"] - before["forward_passes"] < 32


BAD = [
    ("malformed JSON", b'{"query": "wing", "documents": ["a"', 400, "body"),
    ("not an object", b'["wing", "a"]', 400, "body"),
    ("missing query", {"documents": ["a"]}, 400, "query"),
    ("empty query", {"query": " ", "documents": ["a"]}, 400, "query"),
    ("query not a string", {"query": 3, "documents": ["a"]}, 400, "query"),
    ("missing documents", {"query": "wing"}, 400, "documents"),
    ("empty documents", {"query": "wing", "documents": []}, 400, "documents"),
    ("documents not a list", {"query": "wing", "documents": "a"}, 400, "documents"),
    ("non-string document", {"query": "wing", "documents": ["a", 7]}, 400, "documents[1]"),
    ("empty document", {"query": "wing", "documents": ["a", "b", ""]}, 400, "documents[2]"),
    ("document object without text", {"query": "wing", "documents": [{"body": "a"}]}, 400,
     "documents[0]"),
    ("top_n zero", {"query": "wing", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ("top_n negative", {"query": "wing", "documents": ["a"], "top_n": -2}, 400, "top_n"),
    ("top_n not an integer", {"query": "wing", "documents": ["a"], "top_n": "3"}, 400, "top_n"),
    ("return_documents not a boolean",
     {"query": "wing", "documents": ["a"], "return_documents": "yes"}, 400, "return_documents"),
    ("too many documents", {"query": "wing", "documents": ["a"] * (MAX_DOCS + 1)}, 413,
     "documents"),
    ("body over the limit", {"query": "wing", "documents": ["x" * 5000] * 60}, 413, "body"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(server, name, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v2/rerank", content=content,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["object"] == "error" and error["code"] == status
    assert error["param"] == param
    assert error["message"].startswith(f"{param}:"), error["message"]
    # ... and the server still serves.
    assert httpx.get(server.url + "/health").status_code == 200
    ok = rerank(server.url, "what is a wing?", ["A wing is a lifting surface.", "Bananas."])
    assert len(ok["results"]) == 2


def test_other_bad_requests(server):
    # A body over the limit sent in chunks (no Content-Length) is refused as well.
    def chunks():
        yield b'{"query": "wing", "documents": ['
        for _ in range(80):
            yield json.dumps(["y" * 4000] * 1).encode()[1:-1] + b", "
        yield b'"z"]}'

    r = httpx.post(server.url + "/v2/rerank", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["param"] == "body"
    r = httpx.post(server.url + "/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert r.status_code == 400 and r.json()["param"] == "text_2"
    r = httpx.post(server.url + "/score", json={"text_1": "a", "text_2": ["c", None]})
    assert r.status_code == 400 and r.json()["param"] == "text_2[1]"
    r = httpx.post(server.url + "/v2/rerank", content=b'{"query": "a", "documents": ["b"]}',
                   headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "application/json" in r.json()["message"]
    assert httpx.get(server.url + "/v3/rerank").status_code == 404
    assert httpx.get(server.url + "/v2/rerank").status_code == 405
    assert httpx.get(server.url + "/health").json()["batching"]["failed_requests"] == 0


def test_decoder_yes_no_served_as_megarank_score(models, tmp_path):
    requests = cranfield_requests(5, 8, words=50)
    pairs = [(q, d) for q, docs in requests for d in docs]
    want = score_pairs(models["qwen3"], pairs, tmp_path / "score")
    assert max(want) - min(want) > 1e-3
    # The export, and the checkpoint it was exported from, serve the same scores: raw, and
    # as the sigmoid of logit(yes) - logit(no), P(yes | yes or no), on request.
    for name, relevance in (("qwen3", "raw"), ("qwen3_ckpt", "sigmoid")):
        srv = ServerProcess(models[name], tmp_path / name, ["--relevance-score", relevance])
        srv.start()
        try:
            assert "gpt, head yes_no, pooling last" in srv.output
            got = []
            for q, docs in requests:
                got += by_index(rerank(srv.url, q, docs))
            expected = want if relevance == "raw" else [1 / (1 + math.exp(-s)) for s in want]
            assert_close(got, expected)
            if relevance == "sigmoid":
                assert all(0 < g < 1 for g in got)
            scored = httpx.post(srv.url + "/score", json={"text_1": [p[0] for p in pairs],
                                                           "text_2": [p[1] for p in pairs]})
            assert_close([d["score"] for d in scored.json()["data"]], expected)
        finally:
            assert srv.terminate() == 0, srv.output[-3000:]


def refused_server(model: Path, args: list = ()) -> subprocess.CompletedProcess:
    """``megarank serve --model MODEL --port 0 ARGS`` through the command dispatcher, expected to
    stop at start, run in this process on a thread of its own: a server that did start could not
    take this process's signals there (``signal.signal`` works on the main thread only), so it
    fails instead of serving on."""
    result = {}

    def serve():
        result["proc"] = run_cli("megarank.cli", ["serve", "--model", model, "--port", "0",
                                                  *args], check=False)

    import torch

    with torch_threads(torch.get_num_threads()):  # the command sets its own
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        thread.join(300)
    assert "proc" in result, "megarank serve did not stop"
    return result["proc"]


def test_a_model_whose_config_disagrees_with_its_contract_is_refused(models, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(models["qwen3"], bad)
    contract = json.loads((bad / "scoring.json").read_text())
    contract["pooling"] = "cls"  # the decoder scores its last token
    (bad / "scoring.json").write_text(json.dumps(contract))
    proc = refused_server(bad)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"megarank serve: cannot serve {bad}" in proc.stderr
    assert "does not match how this model would score" in proc.stderr
    assert "listening on" not in proc.stderr
    proc = refused_server(models["qwen3"], ["--workers", "2"])
    assert proc.returncode == 2 and "--workers 2" in proc.stderr
    proc = refused_server(models["qwen3"], ["--max-length", "4096"])
    assert proc.returncode == 1 and "--max-length (4096)" in proc.stderr


def test_a_model_failure_is_a_500_for_that_request_only(models):
    """In one process: the engine's scoring function fails on any batch holding the token
    "xylophone"; a clean request that shared the failed forward pass still gets its scores."""
    import uvicorn

    from megarank.serving.app import create_app
    from megarank.serving.engine import RerankEngine, ServeLimits

    engine = RerankEngine.load(models["qwen3"], limits=ServeLimits(max_wait_ms=500))
    poison = engine.collator.tokenizer("xylophone", add_special_tokens=False)["input_ids"]
    real = engine.batcher.score_fn

    def failing(batch):
        if any(bool((batch.input_ids == t).any()) for t in poison):
            raise RuntimeError("the model broke on this batch")
        return real(batch)

    engine.batcher.score_fn = failing
    clean = {"query": "what is a wing?",
             "documents": ["A wing is a lifting surface.", "Bananas are yellow.",
                           "The boundary layer of a wing."]}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: srv.started)
        alone = by_index(httpx.post(url + "/v2/rerank", json=clean, timeout=120).json())

        def call(body):
            return httpx.post(url + "/v2/rerank", json=body, timeout=120)

        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(call, clean)
            bad = pool.submit(call, {"query": "xylophone", "documents": ["a xylophone"]})
            good, bad = good.result(), bad.result()
        assert good.status_code == 200, good.text
        assert_close(by_index(good.json()), alone)
        assert bad.status_code == 500
        assert bad.json()["message"] == ("the model failed on this request: RuntimeError: the "
                                         "model broke on this batch")
        stats = httpx.get(url + "/health").json()["batching"]
        # Both shared the pass that failed, both were scored again alone, one failed again.
        assert stats["retried_requests"] == 2 and stats["failed_requests"] == 1
        assert call(clean).status_code == 200
    finally:
        srv.should_exit = True
        thread.join(60)
        engine.close()


def test_sigterm_lets_the_request_in_flight_finish(server):
    """Last in the module: it stops the shared server."""
    q = "what is the boundary layer of a wing at high speed?"
    docs = [f"{i}: the flow over a wing at high speed makes a boundary layer " * 8
            for i in range(MAX_DOCS)]
    result: dict = {}

    def call():
        result["response"] = httpx.post(server.url + "/v2/rerank",
                                        json={"query": q, "documents": docs}, timeout=300)

    thread = threading.Thread(target=call)
    thread.start()
    assert wait_for(lambda: httpx.get(server.url + "/health").json()["in_flight"] > 0, every=0)
    assert server.terminate() == 0, server.output[-3000:]
    thread.join(60)
    response = result["response"]
    assert response.status_code == 200
    assert sorted(r["index"] for r in response.json()["results"]) == list(range(MAX_DOCS))
    assert "megarank serve: stopped after" in server.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
