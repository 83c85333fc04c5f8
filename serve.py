"""An OpenAI-compatible HTTP server for a checkpoint, with a chat page at /.

    python serve.py --save_file_name sft_checkpoints          # http://127.0.0.1:8000/
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Endpoints: POST /v1/chat/completions and /v1/completions (server-sent events with "stream": true), GET /v1/models
and /health; temperature, top_p, max_tokens, stop, seed and n. Errors are 4xx JSON in OpenAI's shape
({"error": {"message", "type", "param", "code"}}).

Continuous batching: one engine thread decodes every running sequence together, one token per step, through the
model's preallocated latent cache ([max_batch_size, 2 x context] slots). All rows share the write position P; row b
holds its sequence in slots [pad[b], P) (the model's per-row left padding: positions and the mask follow pad). A
new request is prefilled alone (a batch-1 cache) and its cache copied into a free row ending at P, so it joins the
running batch at the next step; a finished, stopped or disconnected sequence leaves it and frees its row. When P
reaches the end of the cache, every row is shifted left by the smallest pad (no row is longer than the context).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from starlette.requests import Request as HTTPRequest  # module level: FastAPI resolves the annotations by name

from config import ServeConfig, UserError, parse_config, run_main

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_STOP_STRINGS = 4
MAX_N = 8
PAGE = Path(__file__).resolve().parent / "chat_page.html"


class RequestError(Exception):
    """A bad request: HTTP status + OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------------------------
# Requests and their sequences


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)


@dataclass
class Choice:
    """One generated sequence (of n per request): its row in the batch, sampler and the text sent so far."""

    index: int
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    row: int = -1
    finish_reason: str | None = None


class Request:
    """One HTTP request as the engine sees it. Events go to the asyncio side through `emit`:
    ("delta", index, text), ("finish", index, reason), ("done", usage) or ("error", message)."""

    def __init__(self, prompt: list[int], params: Params, loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = uuid.uuid4().hex[:24]
        self.prompt, self.params, self.loop = prompt, params, loop
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = False
        self.created = int(time.time())
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.choices = [Choice(i, torch.Generator().manual_seed(seed + i)) for i in range(params.n)]
        self.completion_tokens = 0
        self.stream_options: Any = None  # OpenAI's {"include_usage": true} adds a last chunk with the usage

    def emit(self, *event: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


# ----------------------------------------------------------------------------------------------------------------
# The engine: continuous batching over the latent cache


def _cache_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(attention module, cache attribute) of every per-layer cache (MLA: kv_cache; MHA: k_cache, v_cache)."""
    return [(layer.attn, name) for layer in model.layers for name in ("kv_cache", "k_cache", "v_cache")
            if getattr(layer.attn, name, None) is not None]


class Engine:
    """Runs every request's sequences in one batch on a background thread (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer, stop_ids: Sequence[int], max_batch_size: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = set(stop_ids)
        self.context = model.args.max_seq_len
        self.rows, self.cache_len = max_batch_size, 2 * self.context
        self.device = next(model.parameters()).device
        model.setup_cache(self.rows, self.cache_len, device=self.device)
        self.big = [getattr(attn, name) for attn, name in _cache_slots(model)]
        self.pos = 0                                                      # P: the next slot every row writes
        self.pad = torch.zeros(self.rows, dtype=torch.long)              # first slot of each row's sequence
        self.next_token = torch.zeros(self.rows, dtype=torch.long)       # the sampled token not yet in the cache
        self.slots: list[tuple[Request, Choice] | None] = [None] * self.rows
        self.pending: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.stats = {"requests": 0, "cancelled": 0, "steps": 0, "max_batch": 0}
        self.prefilling: list[tuple[Request, list[int]]] = []
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        with self.lock:
            self.pending.append(request)
            self.stats["requests"] += 1
        self.wake.set()

    def cancel(self, request: Request) -> None:
        """The client went away: the engine frees the request's rows at its next step."""
        if not request.finished and not request.cancelled:
            request.cancelled = True
            self.stats["cancelled"] += 1
            self.wake.set()

    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def queued(self) -> int:
        return len(self.pending)

    # -- engine thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self.stopping:
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.active() == 0:
                        self.wake.wait(timeout=0.5)
                        self.wake.clear()
                        continue
                    self._step()
                except Exception as error:  # never let one bad step kill the server: fail the running requests
                    for (attn, name), big in zip(_cache_slots(self.model), self.big):
                        setattr(attn, name, big)
                    self.model.cache_batch_size, self.model.cache_len = self.rows, self.cache_len
                    failed = {id(r): r for r, _ in self.prefilling}
                    failed.update({id(s[0]): s[0] for s in self.slots if s is not None})
                    for request in failed.values():
                        request.emit("error", f"generation failed: {type(error).__name__}: {error}")
                    self.slots = [None] * self.rows
                finally:
                    self.prefilling = []

    def _drop_cancelled(self) -> None:
        for slot, entry in enumerate(self.slots):
            if entry is not None and entry[0].cancelled:
                self.slots[slot] = None
        with self.lock:
            self.pending = deque(r for r in self.pending if not r.cancelled)

    def _admit(self) -> None:
        """Prefill, in one batch, the waiting requests that fit the free rows (all n sequences of each)."""
        batch: list[tuple[Request, list[int]]] = []
        with self.lock:
            free = [i for i, s in enumerate(self.slots) if s is None]
            while self.pending and len(free) >= self.pending[0].params.n:
                request = self.pending.popleft()
                batch.append((request, free[:request.params.n]))
                free = free[request.params.n:]
        if batch:
            self.prefilling = batch  # owned by the engine until their rows are assigned (errors reach them too)
            self._prefill(batch)

    def _shift(self, delta: int) -> None:
        """Move every row's cache delta slots right (delta > 0) or left (< 0); pads and P follow."""
        for cache in self.big:
            if delta > 0:
                cache[:, delta:] = cache[:, :self.cache_len - delta].clone()
            else:
                cache[:, :self.cache_len + delta] = cache[:, -delta:].clone()
        self.pad += delta
        self.pos += delta

    def _prefill(self, batch: list[tuple[Request, list[int]]]) -> None:
        """The new prompts, left-padded to one length, through a separate cache in one forward; each prompt's
        cache is then copied into its rows, ending at P, and its first token sampled."""
        model = self.model
        lengths = [len(request.prompt) for request, _ in batch]
        longest = max(lengths)
        if self.active() == 0:
            self.pos = longest
        elif self.pos < longest:                      # make room left of P for the longest new prompt
            self._shift(longest - self.pos)
        tokens = torch.full((len(batch), longest), self.tokenizer.pad_id, dtype=torch.long)
        for i, (request, _) in enumerate(batch):
            tokens[i, longest - lengths[i]:] = torch.tensor(request.prompt)
        pad = torch.tensor([longest - n for n in lengths], device=self.device) if min(lengths) < longest else None
        model.setup_cache(len(batch), longest, device=self.device)
        logits = model(tokens.to(self.device), start_pos=0, pad=pad, last_only=True)[:, -1]   # [new, V]
        for (attn, name), big in zip(_cache_slots(model), self.big):
            small = getattr(attn, name)
            for i, (_, rows) in enumerate(batch):
                for row in rows:
                    big[row, self.pos - lengths[i]:self.pos] = small[i, longest - lengths[i]:]
            setattr(attn, name, big)
        model.cache_batch_size, model.cache_len = self.rows, self.cache_len
        entries, logit_rows = [], []
        for i, (request, rows) in enumerate(batch):
            for row, choice in zip(rows, request.choices):
                choice.row = row
                self.slots[row] = (request, choice)
                self.pad[row] = self.pos - lengths[i]
                entries.append((request, choice))
                logit_rows.append(i)
        for (request, choice), token in zip(entries, self._sample(logits[logit_rows], entries)):
            self._accept(request, choice, token)

    def _sample(self, logits: torch.Tensor, entries: list[tuple[Request, Choice]]) -> list[int]:
        """The next token of each sequence from its logits row [len(entries), V]: greedy rows by argmax, the
        others drawn from softmax(logits / temperature) (nucleus-filtered when top_p < 1) with the sequence's
        own generator, so a seeded request draws the same tokens whatever else is in the batch."""
        from generate import top_p_filter

        logits = logits[:, :self.tokenizer.vocab_size].float().cpu()
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, (request, _) in enumerate(entries) if request.params.temperature > 0]
        if sampled:
            temperature = torch.tensor([entries[i][0].params.temperature for i in sampled]).unsqueeze(1)
            scaled = logits[sampled] / temperature
            for j, i in enumerate(sampled):
                if entries[i][0].params.top_p < 1.0:
                    scaled[j:j + 1] = top_p_filter(scaled[j:j + 1], entries[i][0].params.top_p)
            probs = torch.softmax(scaled, dim=-1)
            for j, i in enumerate(sampled):
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=entries[i][1].generator))
        return tokens

    def _step(self) -> None:
        """One decode step for every row up to the last busy one."""
        if self.pos >= self.cache_len:  # every active row is shorter than the context, so its pad is > 0
            busy = [self.pad[i].item() for i, s in enumerate(self.slots) if s is not None]
            self._shift(-min(busy))
        batch = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        idle = torch.tensor([self.slots[i] is None for i in range(batch)])
        pad = torch.where(idle, self.pos, self.pad[:batch])                  # an idle row sees only itself
        tokens = self.next_token[:batch].view(batch, 1).to(self.device)
        logits = self.model(tokens, start_pos=self.pos, pad=pad.to(self.device))[:, -1]   # [batch, V]
        self.pos += 1
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], int((~idle).sum()))
        rows = [row for row in range(batch) if self.slots[row] is not None]
        entries = [self.slots[row] for row in rows]
        for (request, choice), token in zip(entries, self._sample(logits[rows], entries)):
            self._accept(request, choice, token)

    def _accept(self, request: Request, choice: Choice, token: int) -> None:
        """A new token of a sequence: stream its text, or finish the sequence (stop token, stop string, max_tokens
        or the end of the context) and free its row."""
        params = request.params
        reason = None
        if token in self.stop_ids and not params.ignore_eos:
            reason = "stop"
        else:
            choice.ids.append(token)
            request.completion_tokens += 1
            self.next_token[choice.row] = token
        text = self.tokenizer.decode(choice.ids)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and (len(choice.ids) >= params.max_tokens or
                               len(request.prompt) + len(choice.ids) >= self.context):
            reason = "length"
        if reason is None:
            text = text.rstrip("\ufffd")                       # a partial UTF-8 character: wait for the rest
            text = text[:len(text) - _held_back(text, params.stop)]
        if len(text) > len(choice.sent) and text.startswith(choice.sent):
            request.emit("delta", choice.index, text[len(choice.sent):])
            choice.sent = text
        if reason is not None:
            choice.finish_reason = reason
            self.slots[choice.row] = None
            request.emit("finish", choice.index, reason)
            if request.finished:
                request.emit("done", {"prompt_tokens": len(request.prompt),
                                      "completion_tokens": request.completion_tokens,
                                      "total_tokens": len(request.prompt) + request.completion_tokens})


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could be the start of a stop string (not sent yet)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                longest = max(longest, k)
                break
    return longest


# ----------------------------------------------------------------------------------------------------------------
# Request parsing


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return value


def parse_params(body: dict, prompt_len: int, context: int, default_max_tokens: int) -> Params:
    room = context - prompt_len
    if room < 1:
        raise RequestError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                                f"{prompt_len} tokens; shorten it", "messages", "context_length_exceeded")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens")
    elif prompt_len + max_tokens > context:
        raise RequestError(400, f"This model's maximum context length is {context} tokens; you asked for "
                                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate): "
                                f"lower max_tokens to at most {room}", "max_tokens", "context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty "
                                f"strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    return Params(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=tuple(stop),
                  seed=None if seed is None else seed % 2**62, n=_number(body, "n", 1, 1, MAX_N, integer=True),
                  ignore_eos=bool(body.get("ignore_eos", False)))


# ----------------------------------------------------------------------------------------------------------------
# The HTTP application


def create_app(engine: Engine, fmt, model_name: str, default_max_tokens: int = 256, system_prompt: str = ""):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="deepseek toolkit server")

    @app.exception_handler(RequestError)
    async def request_error(_, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(RequestError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error: RequestValidationError):
        return JSONResponse(RequestError(400, str(error)).body(), status_code=400)

    async def read_body(http: HTTPRequest) -> dict:
        try:
            body = json.loads(await http.body())
        except ValueError as error:
            raise RequestError(400, f"the request body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise RequestError(404, f"The model '{model}' does not exist; this server has '{model_name}'",
                               "model", "model_not_found")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": engine.active(), "queued": engine.queued(),
                **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "deepseek-toolkit"}]}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await read_body(http)
        messages = body.get("messages")
        if system_prompt and isinstance(messages, list) and not any(
                isinstance(m, dict) and m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        try:
            prompt = fmt.prompt(_text_messages(messages))
        except ValueError as error:
            raise RequestError(400, str(error), "messages") from None
        return await run(http, body, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_body(http)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
        return await run(http, body, [engine.tokenizer.bos_id] + engine.tokenizer.encode(prompt), chat=False)

    async def run(http: HTTPRequest, body: dict, prompt: list[int], chat: bool):
        params = parse_params(body, len(prompt), engine.context, default_max_tokens)
        request = Request(prompt, params, asyncio.get_running_loop())
        request.stream_options = body.get("stream_options")
        engine.submit(request)
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            return StreamingResponse(stream(http, request, kind, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons = [""] * params.n, [None] * params.n
        try:
            while True:
                try:
                    event = await asyncio.wait_for(request.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if event[0] == "delta":
                    texts[event[1]] += event[2]
                elif event[0] == "finish":
                    reasons[event[1]] = event[2]
                elif event[0] == "error":
                    raise RequestError(500, event[1], kind="server_error")
                elif event[0] == "done":
                    usage = event[1]
                    break
        finally:
            engine.cancel(request)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": ("chatcmpl-" if chat else "cmpl-") + request.id, "object": kind, "created": request.created,
                "model": model_name, "choices": choices, "usage": usage}

    async def stream(http: HTTPRequest, request: Request, kind: str, chat: bool):
        """Server-sent events; the finally runs when the client disconnects too, which frees the rows."""
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + request.id, "object": kind + ".chunk" if chat else kind,
                "created": request.created, "model": model_name}

        def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        try:
            if chat:
                for i in range(request.params.n):
                    yield chunk(i, None, None, first=True)
            while True:
                event = await request.events.get()
                if event[0] == "delta":
                    yield chunk(event[1], event[2], None)
                elif event[0] == "finish":
                    yield chunk(event[1], None, event[2])
                elif event[0] == "error":
                    yield f"data: {json.dumps(RequestError(500, event[1], kind='server_error').body())}\n\n"
                    break
                elif event[0] == "done":
                    if isinstance(body_options := request.stream_options, dict) and body_options.get("include_usage"):
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': event[1]})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(request)

    return app


def _text_messages(messages: Any) -> Any:
    """OpenAI's content may be a list of {"type": "text", "text": ...} parts: join the text parts."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            parts = message["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise ValueError("only text content parts are supported")
            message = {**message, "content": "".join(p["text"] for p in parts)}
        out.append(message)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build(cfg: ServeConfig):
    """(app, engine) for cfg: the model loaded, the engine started."""
    import chat

    model, tok, _, step_dir = chat.load_chat_model(cfg)
    fmt = chat.ChatFormat(tok)
    engine = Engine(model, tok, fmt.stop_ids, cfg.max_batch_size)
    name = cfg.model_name or Path(cfg.save_file_name).resolve().name
    app = create_app(engine, fmt, name, cfg.max_tokens, cfg.system_prompt)
    return app, engine, f"{step_dir} as '{name}'"


def main(argv: Sequence[str] | None = None) -> None:
    cfg: ServeConfig = parse_config(ServeConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.host not in LOCAL_HOSTS and not cfg.allow_remote:
        raise UserError(f"--host {cfg.host} would let other machines use this server (it has no authentication); "
                        f"pass --allow_remote=True to mean it, or keep the default --host 127.0.0.1")
    import uvicorn

    torch.manual_seed(cfg.seed)
    app, engine, step_dir = build(cfg)
    engine.start()
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets=None):  # print the real address (port 0 picks one) once listening
        await original_startup(sockets=sockets)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else cfg.port
        print(f"serving {step_dir} on http://{cfg.host}:{port}/ (batch up to {cfg.max_batch_size}, context "
              f"{engine.context} tokens)", flush=True)

    server.startup = startup
    try:
        server.run()
    finally:
        engine.stop()


if __name__ == "__main__":
    run_main(main)
