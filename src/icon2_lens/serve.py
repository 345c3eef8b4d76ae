"""An OpenAI-compatible chat-completions server for any model `icon2_lens.load_model` takes.

    icon2-lens serve --model path/to/judge-model --port 8000       # CLI (default: the embedded SmolLM2)
    srv = make_server(model, port=0); threading.Thread(target=srv.serve_forever, daemon=True).start()

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (also without the ``/v1`` prefix).
The messages are rendered with the tokenizer's chat template (``add_generation_prompt``), generated
through the HF engine (`icon2_lens.gen.engine`) and cut at the end-of-turn token; ``temperature`` 0
decodes greedily, anything above samples with the request's ``seed`` (a fresh random one when none
is given). ``max_tokens`` (or ``max_completion_tokens``), ``top_p`` and ``stop`` (strings) are
honoured; streaming and ``n > 1`` are refused with a 400. Requests are served one at a time (a
lock around the model), so concurrent clients queue. It is a local tool: no authentication, bind
it to ``127.0.0.1`` (the default).

Its main use is as a judge endpoint for `icon2_lens.judges.ChatEndpointJudge`, the same client that
talks to ``llama_cpp.server`` or vLLM.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .gen import Decoding, engine
from .models import LoadedModel
from .prompts import require_chat_template

__all__ = ["make_server", "serve", "DEFAULT_MAX_TOKENS"]

#: ``max_tokens`` when a request gives none.
DEFAULT_MAX_TOKENS = 256


class _BadRequest(ValueError):
    """A request the server refuses with 400 (its message goes into the OpenAI-style error body)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _content(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _BadRequest(f"messages[{i}] must be an object with a 'role' and a 'content'.", "messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise _BadRequest(f"messages[{i}].content: only text parts are supported.", "messages")
        content = "".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str):
        raise _BadRequest(f"messages[{i}].content must be a string.", "messages")
    return {"role": message["role"], "content": content}


def _number(body: dict[str, Any], key: str, default: float, *, low: float, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise _BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}.", key)
    if value < low:
        raise _BadRequest(f"'{key}' must be at least {low}, got {value!r}.", key)
    return value


def _stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _BadRequest("'stop' must be a string or a list of non-empty strings.", "stop")
    return stops


class _Completer:
    """The model behind the server: renders, generates (one request at a time) and shapes the answer."""

    def __init__(self, model: LoadedModel) -> None:
        require_chat_template(model.tokenizer)
        self.model, self.engine = model, engine(model, "hf")
        self.model_id = model.info.model_id
        self.created = int(time.time())
        self.lock = threading.Lock()

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "icon2_lens"}]}

    def complete(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _BadRequest("The request body must be a JSON object.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' is required: a non-empty list of {role, content} objects.", "messages")
        msgs = [_content(m, i) for i, m in enumerate(messages)]
        if body.get("stream"):
            raise _BadRequest("Streaming is not supported by icon2-lens serve; send stream=false.", "stream")
        if _number(body, "n", 1, low=1, integer=True) != 1:
            raise _BadRequest("Only n=1 is supported.", "n")
        key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        max_tokens = _number(body, key, DEFAULT_MAX_TOKENS, low=1, integer=True)
        temperature = _number(body, "temperature", 1.0, low=0)
        top_p = _number(body, "top_p", 1.0, low=0)
        if top_p == 0 or top_p > 1:
            raise _BadRequest(f"'top_p' must be in (0, 1], got {top_p}.", "top_p")
        seed = _number(body, "seed", secrets.randbelow(2**31), low=0, integer=True)
        stops = _stop_strings(body)
        decoding = Decoding(max_new_tokens=max_tokens, do_sample=temperature > 0,
                            temperature=temperature if temperature > 0 else 1.0, top_p=top_p)
        tok = self.model.tokenizer
        try:
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template refuses the conversation (e.g. roles out of order)
            raise _BadRequest(f"The chat template cannot render these messages: {exc}", "messages") from exc
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        with self.lock:
            gen = self.engine.generate([prompt], decoding, seed=seed)[0]
        text, finished = gen.text, gen.finished
        cuts = [text.index(s) for s in stops if s in text]
        if cuts:
            text, finished = text[:min(cuts)], True
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if finished else "length", "logprobs": None}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": gen.n_tokens,
                          "total_tokens": n_prompt + gen.n_tokens}}


def _error(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _handler(completer: _Completer, log: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "icon2-lens-serve"

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _path(self) -> str:
            path = self.path.split("?", 1)[0].rstrip("/")
            return path[3:] if path.startswith("/v1/") else path

        def do_GET(self) -> None:
            if self._path() == "/models":
                self._send(HTTPStatus.OK, completer.models())
            else:
                self._send(HTTPStatus.NOT_FOUND, _error(f"Unknown path {self.path}; try GET /v1/models or "
                                                        "POST /v1/chat/completions."))

        def do_POST(self) -> None:
            if self._path() != "/chat/completions":
                self._send(HTTPStatus.NOT_FOUND, _error(f"Unknown path {self.path}; POST /v1/chat/completions."))
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise _BadRequest(f"The request body is not valid JSON: {exc}.") from exc
                self._send(HTTPStatus.OK, completer.complete(body))
            except _BadRequest as exc:
                self._send(HTTPStatus.BAD_REQUEST, _error(str(exc), param=exc.param))
            except Exception as exc:  # a failure while generating: answer, keep serving
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _error(f"{type(exc).__name__}: {exc}", "server_error"))

        def log_message(self, format: str, *args: Any) -> None:
            if log:
                super().log_message(format, *args)

    return Handler


def make_server(model: LoadedModel, *, host: str = "127.0.0.1", port: int = 8000,
                log: bool = False) -> ThreadingHTTPServer:
    """The server object, bound but not yet serving (call ``serve_forever``; ``port=0`` picks a free port).

    Args:
        model: a loaded chat model (its tokenizer needs a chat template).
        host: the address to bind (``127.0.0.1``: this machine only).
        port: the TCP port (``0``: any free one; read it back from ``server.server_address[1]``).
        log: print one line per request to stderr.

    Examples:
        >>> srv = make_server(model, port=0)  # doctest: +SKIP
        >>> threading.Thread(target=srv.serve_forever, daemon=True).start()  # doctest: +SKIP
        >>> url = f"http://127.0.0.1:{srv.server_address[1]}/v1"  # doctest: +SKIP
        >>> srv.shutdown(); srv.server_close()  # doctest: +SKIP
    """
    server = ThreadingHTTPServer((host, port), _handler(_Completer(model), log))
    server.daemon_threads = True
    return server


def serve(model: LoadedModel, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``model`` over the OpenAI chat-completions API until interrupted (Ctrl-C).

    Examples:
        >>> serve(il.load_model(), port=8000)  # doctest: +SKIP
        serving SmolLM2-135M-Instruct at http://127.0.0.1:8000/v1 (Ctrl-C stops)
    """
    server = make_server(model, host=host, port=port, log=True)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {model.info.model_id} at http://{bound_host!s}:{bound_port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
