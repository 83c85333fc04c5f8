"""serve.py tested as users use it: the official `openai` client against the running server (streaming,
non-streaming, n, seed, stop, errors), concurrent requests batched with the same greedy results as one at a time
in-process, a disconnecting client freeing its row, and the chat page driven by headless Chromium (Playwright)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import chat
import serve
from chat_fixtures import make_tokenizer, random_model, save_checkpoint, tiny_args

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer(folder / "tok")
    model = random_model(tiny_args(tok.vocab_size, max_seq_len=512), seed=5)
    save_checkpoint(folder / "ckpt", model, tok)
    return folder, tok, model


@pytest.fixture(scope="module")
def server(setup):
    """serve.py started as a user starts it (port 0: a free one, read from its first line)."""
    folder, _, _ = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--save_file_name", str(folder / "ckpt"),
                             "--port", "0", "--model_name", "tiny-chat", "--max_batch_size", "4",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    assert match, line + (proc.stdout.read() if proc.poll() is not None else "")
    yield f"http://127.0.0.1:{match.group(1)}"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_reply(model, tok, messages, max_tokens) -> str:
    """The reference: batch-1 cached greedy decoding in-process, stopping at the chat's stop tokens."""
    fmt = chat.ChatFormat(tok)
    ids = list(chat.stream_tokens(model, fmt.prompt(messages), max_tokens, fmt.stop_ids,
                                  lambda logits: torch.argmax(logits[..., :tok.vocab_size], dim=-1)))
    return tok.decode([i for i in ids if i not in fmt.stop_ids])


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-chat"


def test_chat_completion_non_streaming_and_streaming_equal_the_greedy_reference(client, setup):
    _, tok, model = setup
    messages = ask("Hello world, hello there!")
    expected = greedy_reply(model, tok, messages, 20)
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.prompt_tokens == len(chat.ChatFormat(tok).prompt(messages))
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20,
                                                 temperature=0, stream=True))
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # streamed in pieces
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    with_usage = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_seed_n_and_stop(client, setup):
    _, tok, model = setup
    plain = client.completions.create(model="tiny-chat", prompt="The function returns", max_tokens=16,
                                      temperature=0)
    ids = [tok.bos_id] + tok.encode("The function returns")
    from generate import generate as reference_generate

    expected = tok.decode(reference_generate(model, [ids], 16, temperature=0.0)[0])
    assert plain.choices[0].text == expected
    streamed = client.completions.create(model="tiny-chat", prompt="The function returns", max_tokens=16,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    # n samples with a seed: n different draws, the same again with the same seed
    a = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=12, n=3, seed=7, temperature=1.0)
    b = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=12, n=3, seed=7, temperature=1.0,
                                  top_p=0.99999)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 36
    # a stop string cuts the text before it
    stop = expected[len(expected) // 2:len(expected) // 2 + 3]
    cut = client.completions.create(model="tiny-chat", prompt="The function returns", max_tokens=16,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    cut_stream = client.completions.create(model="tiny-chat", prompt="The function returns", max_tokens=16,
                                           temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in cut_stream) == cut.choices[0].text


def test_concurrent_requests_are_batched_and_give_the_sequential_results(client, server, setup):
    _, tok, model = setup
    prompts = ["Hello", "What does os.path.join do?", "Numbers 12345", "def f(x):", "Explain the with statement.",
               "How are you?"]
    lengths = [30, 12, 25, 18, 9, 22]
    expected = [greedy_reply(model, tok, ask(p), n) for p, n in zip(prompts, lengths)]
    before = httpx.get(server + "/health").json()

    def one(i):
        stream = client.chat.completions.create(model="tiny-chat", messages=ask(prompts[i]), max_tokens=lengths[i],
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, range(len(prompts))))
    assert got == expected
    after = httpx.get(server + "/health").json()
    assert after["max_batch"] >= 2  # sequences did share decode steps
    assert after["steps"] - before["steps"] < sum(lengths)
    assert after["active"] == 0


def test_errors_have_openai_shape(client, server, setup):
    import openai

    response = httpx.post(server + "/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=ask("hi"))
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-chat", messages=ask("hello " * 600))
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="roles"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-chat", prompt="hi", temperature=7)
    assert httpx.get(server + "/nowhere").json()["error"]["code"] == "not_found"


def test_a_disconnecting_client_frees_its_row(server):
    body = {"model": "tiny-chat", "messages": ask("Hello"), "max_tokens": 480, "temperature": 1.0, "stream": True}
    before = httpx.get(server + "/health").json()
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert all(not line or line.startswith("data: ") for line in received)
    # the server notices, frees the row long before 480 tokens would have been generated
    for _ in range(200):
        health = httpx.get(server + "/health").json()
        if health["active"] == 0 and health["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert health["active"] == 0 and health["cancelled"] == before["cancelled"] + 1
    assert health["steps"] - before["steps"] < 470


def test_binding_beyond_localhost_needs_the_flag(setup, script):
    folder, _, _ = setup
    result = script("serve.py", "--save_file_name", str(folder / "ckpt"), "--host", "0.0.0.0")
    assert result.returncode != 0 and "--allow_remote" in result.stderr and "Traceback" not in result.stderr


def test_held_back_stop_prefixes():
    assert serve._held_back("hello wor", ["world"]) == 3
    assert serve._held_back("hello", ["xyz"]) == 0


@pytest.mark.slow
def test_chat_page_streams_a_reply_in_headless_chromium(server, tmp_path):
    """Debian's chromium, driven by Playwright: type a message, watch the reply grow, save a screenshot."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('title').textContent.includes('tiny-chat')")
            page.fill("#input", "Hello world, hello there!")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            # seen while streaming: some text is there before the reply is complete
            page.wait_for_function("(() => { const r = [...document.querySelectorAll('.msg.assistant')].pop();"
                                   " return r && r.textContent.length > 0 && r.dataset.state === 'streaming'; })()",
                                   polling=5)
            page.wait_for_function("[...document.querySelectorAll('.msg.assistant')].pop().dataset.state === 'done'",
                                   timeout=60000)
            text = reply.text_content()
            assert len(text) > 5
            assert page.locator(".msg.user").first.text_content() == "Hello world, hello there!"
            # CHAT_SCREENSHOT=path keeps a copy to look at
            page.screenshot(path=os.environ.get("CHAT_SCREENSHOT") or str(tmp_path / "chat_page.png"))
        finally:
            browser.close()
    assert Path(os.environ.get("CHAT_SCREENSHOT") or tmp_path / "chat_page.png").stat().st_size > 1000


def test_a_failing_step_fails_its_requests_and_the_engine_recovers(setup, monkeypatch):
    _, tok, model = setup
    events: list = []

    class Captured(serve.Request):
        def emit(self, *event):
            events.append(event)

    engine = serve.Engine(model, tok, [tok.eos_id], 2)
    engine.start()
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(model, "forward", broken)
        engine.submit(Captured([tok.bos_id, 40, 41], serve.Params(max_tokens=4), None))
        for _ in range(400):
            if events:
                break
            time.sleep(0.01)
        assert events and events[0][0] == "error" and "boom" in events[0][1]
        monkeypatch.undo()
        events.clear()
        request = Captured([tok.bos_id, 40, 41], serve.Params(max_tokens=4, temperature=0.0), None)
        engine.submit(request)
        for _ in range(1000):
            if request.finished and events and events[-1][0] == "done":
                break
            time.sleep(0.01)
        assert events[-1] == ("done", {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    finally:
        engine.stop()
