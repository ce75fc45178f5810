"""A small OpenAI-compatible chat-completions server for a local Hugging Face causal LM.

It lets the `openai` feedback backend be tested against a real HTTP server, and lets a person serve a trained policy
to anything that speaks the OpenAI API:

    python -m tasks.openai_server store/sl_cai/<key>/model --port 8000 [--api-key-env NAME]

It serves GET /v1/models and POST /v1/chat/completions (messages, max_tokens or max_completion_tokens, temperature,
seed, logprobs, top_logprobs, n=1, and vLLM's continue_final_message / add_generation_prompt for continuing a final
assistant message). Log-probabilities are those of the model's raw distribution, before temperature, as vLLM returns
them. Not a production server: one request at a time goes through the model, and nothing streams.
"""

import argparse
import hmac
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tasks.feedback import TOP_LOGPROBS, HFFeedback, sampling_kwargs

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256


class BadRequest(ValueError):
    """A request the server refuses with 400 and this message."""


class ChatCompletionsServer(ThreadingHTTPServer):
    """Serves one model directory on host:port (port 0 picks a free one); use as a context manager.

    api_key: when set, every request must carry `Authorization: Bearer <api_key>`.
    fail_first: answer the first N chat-completion requests with 503, to exercise a client's retries.
    """

    daemon_threads = True

    def __init__(self, model_dir: Path, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                 api_key: str | None = None, fail_first: int = 0):
        super().__init__((host, port), Handler)
        self.lm = HFFeedback(Path(model_dir))
        self.model_name = model_name or Path(model_dir).name
        self.api_key = api_key
        self.failures_left = fail_first
        self.requests_seen = 0  # chat-completion requests that reached the server, failed ones included
        self._counter_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one generation at a time: the CPU threads are already busy with one
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self._thread = threading.Thread(target=self.serve_forever, name="openai-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self._thread.join()

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.api_key}".encode())

    def should_fail(self) -> bool:
        with self._counter_lock:
            self.requests_seen += 1
            if self.failures_left > 0:
                self.failures_left -= 1
                return True
            return False

    def complete(self, body: dict) -> dict:
        """One chat completion in the OpenAI response schema."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects with string content")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
        temperature = body.get("temperature", 1.0)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise BadRequest("temperature must be between 0 and 2")
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be an integer from 0 to {TOP_LOGPROBS}")
        if top and not body.get("logprobs"):
            raise BadRequest("top_logprobs needs logprobs=true")
        continue_final = bool(body.get("continue_final_message", False))
        generation_prompt = bool(body.get("add_generation_prompt", not continue_final))
        if continue_final and (generation_prompt or messages[-1]["role"] != "assistant"):
            raise BadRequest("continue_final_message needs add_generation_prompt=false and a final assistant message")

        tokenizer, eos = self.lm.tokenizer, self.lm.tokenizer.eos_token_id
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                    continue_final_message=continue_final, tokenize=True,
                                                    return_dict=True)["input_ids"])
        ids = torch.tensor([prompt])
        with self._model_lock, torch.inference_mode(), torch.random.fork_rng(devices=[]):
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            out = self.lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                         eos_token_id=eos, pad_token_id=self.lm.pad_id, output_logits=True,
                                         return_dict_in_generate=True, **sampling_kwargs(float(temperature)))
        new = out.sequences[0, len(prompt) :].tolist()
        finish = "stop" if new and new[-1] == eos else "length"
        kept = new[:-1] if finish == "stop" else new  # the stop token is not part of the reply
        reply = tokenizer.decode(kept, skip_special_tokens=True).strip()  # our tokenizer opens every turn with a space
        choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None,
                  "finish_reason": finish}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [token_logprobs(tokenizer, out.logits[step][0], token, top)
                                              for step, token in enumerate(kept)]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(new),
                          "total_tokens": len(prompt) + len(new)}}


def token_logprobs(tokenizer, logits: torch.Tensor, token: int, top: int) -> dict:
    """The chosen token's log-probability and the `top` most likely alternatives, under log_softmax(logits)."""
    logp = logits.float().log_softmax(-1)
    best = logp.topk(top) if top else None
    return {"token": tokenizer.decode([token]), "logprob": logp[token].item(),
            "top_logprobs": [] if best is None else [{"token": tokenizer.decode([i]), "logprob": v}
                                                     for v, i in zip(best.values.tolist(), best.indices.tolist())]}


class Handler(BaseHTTPRequestHandler):
    server: ChatCompletionsServer

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)  # the request line only: headers carry the key

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, kind: str) -> None:
        self.send_json(status, {"error": {"message": message, "type": kind, "code": status}})

    def check_key(self) -> bool:
        if self.server.authorized(self.headers.get("Authorization")):
            return True
        self.send_error_json(401, "invalid or missing API key", "authentication_error")
        return False

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self.send_error_json(404, f"no route {self.path}", "not_found")
        if self.check_key():
            self.send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                             "owned_by": "alignflow"}]})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.send_error_json(404, f"no route {self.path}", "not_found")
        if not self.check_key():
            return
        if self.server.should_fail():
            return self.send_error_json(503, "injected failure (fail_first)", "server_error")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            self.send_json(200, self.server.complete(body))
        except ValueError as e:  # a malformed body, or a conversation the chat template refuses
            self.send_error_json(400, str(e), "invalid_request_error")
        except Exception as e:
            log.exception("chat completion failed")
            self.send_error_json(500, f"{type(e).__name__}: {e}", "server_error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the name clients send (default: the directory's name)")
    parser.add_argument("--api-key-env", help="NAME of an environment variable holding the key clients must send")
    args = parser.parse_args()
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        parser.error(f"the environment variable {args.api_key_env} is not set")
    logging.basicConfig(level=logging.INFO)
    with ChatCompletionsServer(args.model_dir, args.host, args.port, args.model_name, api_key=key) as server:
        print(f"serving {server.model_name} at {server.url}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
