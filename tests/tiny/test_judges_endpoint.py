"""`icon2_lens.serve` (an OpenAI-compatible server) and `ChatEndpointJudge` talking to it over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
import torch
from conftest import build_model_folder, build_tokenizer

import icon2_lens as il
from icon2_lens.judges import ChatEndpointJudge, Judge, JudgeEndpointError, PairwiseJudge, judge_summary
from icon2_lens.serve import make_server

QS = ["Name a river.", "What is 2+2?", "Write a haiku about the sea."]
A = ["The Nile.", "4", "Waves fold into foam / the gulls argue with the wind / salt on every stone"]
B = ["Banana.", "Twenty-two, probably, or maybe five.", "Sea."]


def _running(model):
    srv = make_server(model, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture(scope="module")
def server(tiny_model):
    srv, url = _running(tiny_model)
    yield url
    srv.shutdown()
    srv.server_close()


def _says(folder, letter: str):
    """A tiny Llama whose greedy next token is always ``letter`` (the judge that always names one position)."""
    from transformers import LlamaForCausalLM

    build_model_folder(folder)
    hf = LlamaForCausalLM.from_pretrained(folder)
    tid = build_tokenizer().convert_tokens_to_ids(letter)
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 1.0
        hf.lm_head.weight[:, 0] = 0.0
        hf.lm_head.weight[tid, 0] = 10.0
    hf.save_pretrained(folder)
    return il.load_model(folder, device="cpu")


def _post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_models_and_completion_shape(server, tiny_model):
    with urllib.request.urlopen(server + "/v1/models", timeout=30) as resp:
        models = json.loads(resp.read())
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_model.info.model_id
    body = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 5}
    status, out = _post(server + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and isinstance(out["created"], int)
    assert out["model"] == tiny_model.info.model_id
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert u["prompt_tokens"] > 0 and 1 <= u["completion_tokens"] <= 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # greedy is deterministic and equals the engine's own greedy decoding; without /v1 the path works too
    status2, again = _post(server + "/chat/completions", json.dumps(body).encode())
    assert status2 == 200 and again["choices"][0]["message"] == choice["message"]
    prompt = il.render_chat(tiny_model.tokenizer, "Hi")
    want = il.gen.engine(tiny_model).generate([prompt], il.gen.Decoding(max_new_tokens=5))[0]
    assert choice["message"]["content"] == want.text
    assert choice["finish_reason"] == ("stop" if want.finished else "length")
    # sampling with a seed is reproducible
    sampled = {**body, "temperature": 0.9, "seed": 7, "max_tokens": 8}
    outs = [_post(server + "/v1/chat/completions", json.dumps(sampled).encode())[1] for _ in range(2)]
    assert outs[0]["choices"][0]["message"] == outs[1]["choices"][0]["message"]


@pytest.mark.parametrize("data, word", [
    (b"{not json", "not valid JSON"),
    (b'{"model": "x"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "stream": true}', "Streaming"),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}', "max_tokens"),
    (b'[1, 2]', "JSON object"),
])
def test_bad_requests_get_400_with_an_openai_error(server, data, word):
    status, out = _post(server + "/v1/chat/completions", data)
    assert status == 400
    assert out["error"]["type"] == "invalid_request_error" and word in out["error"]["message"]


def test_unknown_path_is_404(server):
    status, out = _post(server + "/v1/completions", b"{}")
    assert status == 404 and "chat/completions" in out["error"]["message"]


def test_endpoint_judge_asks_both_orders_over_http(server):
    judge = ChatEndpointJudge(server, "tiny", max_workers=3)
    assert isinstance(judge, Judge)
    asked: list[str] = []
    ask = judge.ask

    def recording(prompt: str) -> str:
        asked.append(prompt)
        return ask(prompt)

    judge.ask = recording  # type: ignore[method-assign]
    ab, ba = judge.orders(QS, A, B)
    assert len(ab) == len(ba) == 3 and all(isinstance(x, bool) for x in ab + ba)
    assert judge.asked == 6 and 0 <= judge.unparsed <= 6
    for q, x, y in zip(QS, A, B, strict=True):  # both orders of every item were sent
        assert PairwiseJudge.PROMPT.format(q=q, a=x, b=y) in asked
        assert PairwiseJudge.PROMPT.format(q=q, a=y, b=x) in asked
    got = judge.compare(QS, A, B)
    assert set(got) <= {0.0, 0.5, 1.0} and len(got) == 3
    assert judge.asked == 12


def test_a_judge_that_always_says_one_letter_is_unable_to_judge(tmp_path):
    for letter, share, side in (("A", 1.0, "first"), ("B", 0.0, "second")):
        model = _says(tmp_path / letter, letter)
        srv, url = _running(model)
        try:
            judge = ChatEndpointJudge(url + "/v1/", "tiny", max_tokens=1)
            ab, ba = judge.orders(QS, A, B)
            assert judge.unparsed == 0  # the replies are the one letter
            assert judge.compare(QS, A, B) == [0.5, 0.5, 0.5]  # a position, not a preference: ties
            if letter == "A":  # stop strings cut the reply ("AAAA" at "AA") and end it with "stop"
                body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4}
                full = _post(url + "/v1/chat/completions", json.dumps(body).encode())[1]["choices"][0]
                cut = _post(url + "/v1/chat/completions", json.dumps({**body, "stop": ["AA"]}).encode())[1]
                assert (full["message"]["content"], full["finish_reason"]) == ("AAAA", "length")
                assert (cut["choices"][0]["message"]["content"], cut["choices"][0]["finish_reason"]) == ("", "stop")
        finally:
            srv.shutdown()
            srv.server_close()
        s = judge_summary(ab, ba)
        assert s["first_position_share"] == share and s["able_to_judge"] is False
        assert s["note"] == f"unable to judge: picks the {side} position in 100% of verdicts"


def test_closed_port_says_a_server_must_run():
    port = _free_port()
    judge = ChatEndpointJudge(f"http://127.0.0.1:{port}", "m", timeout=5)
    with pytest.raises(JudgeEndpointError, match=rf"127\.0\.0\.1:{port}/v1.*server must be running"):
        judge.compare(["q"], ["a"], ["b"])


def test_http_error_shows_status_and_body(server):
    judge = ChatEndpointJudge(server + "/nowhere", "m")
    with pytest.raises(JudgeEndpointError, match=r"HTTP 404.*Unknown path"):
        judge.compare(["q"], ["a"], ["b"])


def test_bad_options_and_url_forms():
    with pytest.raises(ValueError, match="http://"):
        ChatEndpointJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match="max_workers"):
        ChatEndpointJudge("http://h:1", "m", max_workers=0)
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/", "http://h:1/v1/chat/completions"):
        assert ChatEndpointJudge(url, "m").url == "http://h:1/v1"
    with pytest.raises(TypeError, match="compare"):
        ChatEndpointJudge("http://h:1", "m")(["q"], ["a"], ["c"])


def test_pairwise_judge_load_goes_through_load_model(tiny_model_dir, tiny_model):
    judge = PairwiseJudge.load(tiny_model_dir, device="cpu", batch_size=2)
    assert judge.model.info.fingerprint == tiny_model.info.fingerprint and judge.batch_size == 2
    assert judge.orders(QS, A, B) == PairwiseJudge(tiny_model).orders(QS, A, B)


def test_server_refuses_a_model_without_chat_template(tiny_model_no_template_dir):
    model = il.load_model(tiny_model_no_template_dir, device="cpu")
    with pytest.raises(ValueError, match="chat template"):
        make_server(model, port=0)
