"""tasks.py: the built-in verifiable tasks (deterministic, disjoint held-out set), the exact-match reward, the
supervised batches, greedy accuracy, and the SFT stage on the training core."""
from __future__ import annotations

import json

import pytest
import torch

import tasks
from config import UserError
from tests.conftest import run_script
from tests.stage_fixtures import tiny_checkpoint

# ----------------------------------------------------------------------------------------------------------------
# The built-in tasks


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_builtin_tasks_are_deterministic_with_a_disjoint_test_set(task):
    train, test = tasks.problems(task, "train"), tasks.problems(task, "test")
    assert len(test) == tasks.TEST_SIZE and train[:50] == tasks.problems(task, "train")[:50]
    assert not {p.prompt for p in test} & {p.prompt for p in train}
    for p in test[:50]:
        if task == "reverse":
            assert p.answer == p.prompt[len("reverse "):-1][::-1]
        else:
            a, b = map(int, p.prompt.rstrip("=").split("+"))
            assert p.answer == str(a + b)
    with pytest.raises(UserError, match="unknown built-in task"):
        tasks.problems("multiply", "train")


def test_exact_match_reward():
    assert tasks.exact_match("1+1=", " 2 ", "2") == 1.0
    assert tasks.exact_match("1+1=", "22", "2") == 0.0
    assert tasks.exact_match("1+1=", "2", None) == 0.0



def test_supervised_batch_trains_only_the_answer_and_its_eos(tmp_path):
    from tests.stage_fixtures import make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    x, y = tasks.supervised_batch(tok, [("12+3=", "15"), ("1+1=", "2")])
    for row, (prompt, answer) in enumerate([("12+3=", "15"), ("1+1=", "2")]):
        p, a = tasks.encode_prompt(tok, prompt), tasks.encode_answer(tok, answer)
        ids = p + a
        assert x[row, :len(ids) - 1].tolist() == ids[:-1]
        assert y[row].tolist() == [-1] * (len(p) - 1) + a + [-1] * (y.shape[1] - len(ids) + 1)
        assert a[-1] == tok.eos_id


def test_greedy_accuracy_counts_exact_answers(tmp_path):
    """generate() stood in by an oracle that answers every problem right except the first."""
    from tests.stage_fixtures import make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    items = tasks.problems("add2", "test")[:6]
    answers = {tuple(tasks.encode_prompt(tok, p.prompt)): tasks.encode_answer(tok, p.answer) for p in items[1:]}
    import generate as gen_module

    def fake_generate(model, prompts, max_new_tokens, **kw):
        return [answers.get(tuple(p), [tok.eos_id]) for p in prompts]

    real = gen_module.generate
    gen_module.generate = fake_generate
    try:
        acc, texts = tasks.accuracy(torch.nn.Linear(1, 1), tok, items)
    finally:
        gen_module.generate = real
    assert acc == pytest.approx(5 / 6) and texts[0] == "" and texts[1] == items[1].answer


@pytest.mark.slow
def test_sft_cli_trains_and_reports_held_out_accuracy(tmp_path):
    start, _ = tiny_checkpoint(tmp_path)
    proc = run_script("tasks.py", "--init_from", str(start), "--save_file_name", str(tmp_path / "sft"), "--steps",
                      "3", "--batch_size", "8", "--eval_rate", "3", "--eval_problems", "10",
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "sft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert 0.0 <= [r for r in records if r["kind"] == "eval"][-1]["test_accuracy"] <= 1.0
