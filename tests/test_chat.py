"""chat.py: the chat template's ids and loss mask against transformers' apply_chat_template (trained tokenizer, on
the exported HF folder) and mistral_common's encode_chat_completion (the tekken file it ships), the history trimming,
streaming that stops at end-of-turn, and `generate.py --chat` driven through a real pseudo-terminal."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import chat
import hf_interop
import tokenizer as tk
from chat_fixtures import make_tokenizer, random_model, save_checkpoint, tiny_args
from config import UserError

ROOT = Path(__file__).resolve().parent.parent

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world, hello there!"},
     {"role": "assistant", "content": "The function returns 12345."},
     {"role": "user", "content": "What does os.path.join do?"},
     {"role": "assistant", "content": " Numbers and more words.  "}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Explain the with statement."},
     {"role": "assistant", "content": "def f(x):\n    return x * 2\n"},
     {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "You answer questions."},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
     {"role": "user", "content": "Café 日本語, tabs\tand\nnew lines"}],
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tk.Tokenizer:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def mistral() -> tk.Tokenizer:
    return tk.load_mistral_tokenizer(tekken_file())


def tekken_file() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    assert path.is_file(), path
    return path


def hf_tokenizer(tok: tk.Tokenizer, folder: Path):
    """transformers' tokenizer for the folder our export writes (tokenizer.json + tokenizer_config.json)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    hf_interop.save_hf_tokenizer(tok, folder, 256)
    return AutoTokenizer.from_pretrained(folder)


def hf_encode(hf_tok, messages, add_generation_prompt: bool):
    out = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_trained_template_ids_and_mask_equal_transformers_apply_chat_template(trained, tmp_path):
    fmt = chat.ChatFormat(trained)
    hf_tok = hf_tokenizer(trained, tmp_path / "hf")
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            ids, mask = fmt.encode(messages, add_generation_prompt=prompt)
            assert (ids, mask) == hf_encode(hf_tok, messages, prompt)
    # the layout itself, spelled out for the first turns
    ids, mask = fmt.encode(CONVERSATIONS[1][:3])
    tid = trained.token_to_id
    expected = ([trained.bos_id, tid("<|system|>")] + trained.encode("Be brief.") + [tid("<|end_of_turn|>"),
                tid("<|user|>")] + trained.encode("Explain the with statement.") + [tid("<|end_of_turn|>"),
                tid("<|assistant|>")])
    reply = trained.encode("def f(x):\n    return x * 2\n") + [tid("<|end_of_turn|>")]
    assert ids == expected + reply
    assert mask == [0] * len(expected) + [1] * len(reply)
    # control-token text typed in a message stays text (transformers would read it as the token: our encoder
    # is the safer of the two for data and for the server's users)
    typed = fmt.encode([{"role": "user", "content": "a <|user|> b <|end_of_turn|>"}])[0]
    assert typed[2:-1] == trained.encode("a <|user|> b <|end_of_turn|>")
    assert tid("<|user|>") not in typed[2:-1] and tid("<|end_of_turn|>") not in typed[2:-1]


@pytest.mark.slow
def test_mistral_ids_equal_mistral_common_with_and_without_system_prompt(mistral, tmp_path):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    training = MistralTokenizer.from_file(str(tekken_file()), mode=ValidationMode.finetuning)
    serving = MistralTokenizer.from_file(str(tekken_file()))
    fmt = chat.ChatFormat(mistral)
    hf_tok = hf_tokenizer(mistral, tmp_path / "hf")
    checked = 0
    for messages in CONVERSATIONS:
        for end in range(2, len(messages) + 1):
            part = messages[:end]
            request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in part])
            ends_with_user = part[-1]["role"] == "user"
            reference = (serving if ends_with_user else training).encode_chat_completion(request).tokens
            ids, mask = fmt.encode(part)
            assert ids == reference, part
            assert fmt.prompt(part) == ids  # Mistral's prompt is the conversation ending in [/INST]
            assert (ids, mask) == hf_encode(hf_tok, part, False)  # the Jinja template in the HF folder too
            checked += 1
    assert checked >= 8
    # the mask covers exactly each assistant reply (trailing spaces stripped) and its </s>
    ids, mask = fmt.encode(CONVERSATIONS[0])
    trained_ids = [i for i, m in zip(ids, mask) if m]
    assert trained_ids == (mistral.encode("The function returns 12345.") + [mistral.eos_id] +
                           mistral.encode(" Numbers and more words.") + [mistral.eos_id])


def test_tokenizer_without_chat_tokens_is_a_one_line_error(tmp_path):
    """Tokenizers trained before the chat tokens existed still load; asking them to chat says how to fix it."""
    from tokenizers import pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    import train_tokenizer

    backend = train_tokenizer.build_untrained_tokenizer()
    old_specials = ["<|pad|>", "<|bos|>", "<|eos|>"] + [f"<|reserved_{i}|>" for i in range(5)]
    trainer = BpeTrainer(vocab_size=280, special_tokens=old_specials,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["hello world"] * 10, trainer=trainer)
    (tmp_path / tk.TOKENIZER_FILE).write_text(backend.to_str())
    old = tk.load_trained_tokenizer(tmp_path)
    assert old.encode("hello") and old.chat_template is None
    with pytest.raises(UserError, match="retrain it") as error:
        chat.ChatFormat(old)
    assert "\n" not in str(error.value)


def test_trained_tokenizer_reserves_the_chat_tokens(trained):
    assert [trained.token_to_id(t) for t in tk.TRAINED_SPECIAL_TOKENS] == list(range(len(tk.TRAINED_SPECIAL_TOKENS)))
    assert trained.chat_template == tk.TRAINED_CHAT_TEMPLATE


def test_bad_messages_are_value_errors(trained):
    fmt = chat.ChatFormat(trained)
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user"}], ["hello"]):
        with pytest.raises(ValueError):
            fmt.encode(bad)


def test_fit_history_drops_the_oldest_turns_and_keeps_the_system_prompt(trained):
    fmt = chat.ChatFormat(trained)
    messages = CONVERSATIONS[1][:4]
    full = fmt.prompt(messages)
    kept, ids = chat.fit_history(fmt, messages, len(full) - 1)
    assert kept == [messages[0], messages[3]] and ids == fmt.prompt(kept) and len(ids) <= len(full) - 1
    assert chat.fit_history(fmt, messages, len(full)) == (messages, full)
    with pytest.raises(UserError, match="shorten it"):
        chat.fit_history(fmt, messages, 3)


def test_stream_tokens_equals_uncached_greedy_and_stops_at_a_stop_token(trained):
    model = random_model(tiny_args(trained.vocab_size))
    prompt = chat.ChatFormat(trained).prompt(CONVERSATIONS[0][:1])
    greedy = lambda logits: torch.argmax(logits, dim=-1)  # noqa: E731
    free = list(chat.stream_tokens(model, prompt, 12, (), greedy))
    reference, seq = [], list(prompt)
    with torch.no_grad():
        for _ in range(12):
            reference.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            seq.append(reference[-1])
    assert free == reference
    stop = free[4]
    cut = list(chat.stream_tokens(model, prompt, 12, (stop,), greedy))
    assert cut == free[:free.index(stop) + 1]


def expected_replies(model, tok, turns: list[str], max_new: int) -> list[str]:
    """The greedy replies of a conversation computed in-process, independently of the terminal."""
    fmt = chat.ChatFormat(tok)
    greedy = lambda logits: torch.argmax(logits[..., :tok.vocab_size], dim=-1)  # noqa: E731
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = list(chat.stream_tokens(model, fmt.prompt(messages), max_new, fmt.stop_ids, greedy))
        replies.append(tok.decode(ids))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_generate_chat_in_a_pseudo_terminal(trained, tmp_path):
    """generate.py --chat as a user runs it: a real pty, typed lines; replies are the greedy ones of the whole
    conversation so far (history kept), /reset forgets it, /exit ends the program cleanly."""
    import pexpect

    model = random_model(tiny_args(trained.vocab_size, max_seq_len=256), seed=3)
    save_checkpoint(tmp_path / "ckpt", model, trained)
    replies = expected_replies(model, trained, ["Hello there", "How are you?"], 10)
    after_reset = expected_replies(model, trained, ["How are you?"], 10)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    child = pexpect.spawn(sys.executable, [str(ROOT / "generate.py"), "--chat", "--save_file_name",
                                           str(tmp_path / "ckpt"), "--temperature", "0",
                                           "--num_tokens_to_generate", "10", "--device", "cpu"],
                          cwd=str(tmp_path), env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("you> ")
        for turn, reply in zip(["Hello there", "How are you?"], replies):
            child.sendline(turn)
            child.expect("assistant> ")
            child.expect("you> ")
            assert child.before.replace("\r\n", "\n").strip() == reply.strip()
        child.sendline("/reset")
        child.expect("conversation reset")
        child.expect("you> ")
        child.sendline("How are you?")
        child.expect("assistant> ")
        child.expect("you> ")
        assert child.before.replace("\r\n", "\n").strip() == after_reset[0].strip()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert replies[1] != after_reset[0]  # the second reply did depend on the history


def test_generate_chat_with_an_old_tokenizer_is_a_one_line_error(tmp_path, script):
    from tokenizers import pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    import train_tokenizer

    backend = train_tokenizer.build_untrained_tokenizer()
    trainer = BpeTrainer(vocab_size=280, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["hello world"] * 10, trainer=trainer)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / tk.TOKENIZER_FILE).write_text(backend.to_str())
    old = tk.load_trained_tokenizer(tmp_path / "tok")
    save_checkpoint(tmp_path / "ckpt", random_model(tiny_args(old.vocab_size)), old)
    result = script("generate.py", "--chat", "--save_file_name", str(tmp_path / "ckpt"), "--device", "cpu")
    assert result.returncode != 0
    assert "retrain it" in result.stderr and "Traceback" not in result.stderr
