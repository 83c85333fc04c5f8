"""checkpoint.py: save/load round trips, listing and resolving, atomicity under failures, damaged files, safe
loading of training state (a crafted pickle runs nothing), deterministic files, run-folder ownership and locks."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from config import ModelArgs, UserError, model_args_from_preset
from model import Transformer

ARGS = model_args_from_preset("tiny", vocab_size=64, dim=32, n_layers=2, n_heads=2, inter_dim=48, moe_inter_dim=16,
                              kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                              n_routed_experts=4, n_activated_experts=2)


def make_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    model.init_weights()
    return model


def save(root: Path, step: int, model: Transformer, run_id: str | None = "r1", keep: int = 3, **kw) -> Path:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    state = {"step": step, "loader": [{"position": 3}], "rng": [{"torch": torch.get_rng_state()}], "world_size": 1}
    return checkpoint.save_checkpoint(root, step, model, optimizer, {"model_args": ARGS.to_dict()}, state,
                                      keep=keep, run_id=run_id, **kw)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_weights_optimizer_and_state(tmp_path: Path) -> None:
    model = make_model()
    step_dir = save(tmp_path, 5, model)
    assert step_dir == tmp_path / "step_000005" and checkpoint.verify_checkpoint(step_dir, deep=True) is None
    weights, opt_state, state = checkpoint.load_train_state(step_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    assert state["loader"] == [{"position": 3}] and state["rng"][0]["torch"].dtype == torch.uint8
    assert set(opt_state) == {"state", "param_groups"}
    loaded, meta = checkpoint.load_model(tmp_path)
    assert ModelArgs.from_dict(meta["model_args"]) == ARGS and meta["step"] == 5 and meta["run_id"] == "r1"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    recorded = meta["files"]
    assert set(recorded) == {"model.safetensors", "optimizer.pt", "train_state.pt"}
    assert all(recorded[n]["sha256"] == sha(step_dir / n) for n in recorded)


def test_identical_weights_give_identical_files(tmp_path: Path) -> None:
    # the safetensors writer emits its metadata map in hash order: two processes must still write the same bytes
    code = ("import sys, torch, checkpoint; sys.path.insert(0, '.'); torch.manual_seed(0); "
            "sd = {'b': torch.randn(3), 'a': torch.randn(2, 2)}; sd['tied'] = sd['a']; "
            "checkpoint.save_weights(__import__('pathlib').Path(sys.argv[1]), sd)")
    root = Path(checkpoint.__file__).parent
    digests = set()
    for i, seed in enumerate(["1", "2", "3", "4"]):
        out = tmp_path / f"w{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=root, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        digests.add(sha(out))
        loaded = checkpoint.load_weights(out)
        assert set(loaded) == {"a", "b", "tied"} and torch.equal(loaded["tied"], loaded["a"])
    assert len(digests) == 1


def test_list_latest_and_resolve(tmp_path: Path) -> None:
    model = make_model()
    for step in (2, 10, 4):
        save(tmp_path, step, model, keep=0)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000002", "step_000004", "step_000010"]
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "step_000010"
    assert checkpoint.resolve_checkpoint(tmp_path) == tmp_path / "step_000010"
    assert checkpoint.resolve_checkpoint(tmp_path / "step_000004") == tmp_path / "step_000004"
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint found"):
        checkpoint.resolve_checkpoint(tmp_path / "empty")


def test_pruning_keeps_the_newest_of_this_run_only(tmp_path: Path) -> None:
    model = make_model()
    for step in (1, 2, 3):
        save(tmp_path, step, model, run_id="old", keep=0)
    for step in (4, 5, 6):
        save(tmp_path, step, model, run_id="new", keep=2)
    names = [p.name for p in checkpoint.step_folders(tmp_path)]
    assert names == ["step_000001", "step_000002", "step_000003", "step_000005", "step_000006"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path, "old")] == ["step_000001", "step_000002",
                                                                               "step_000003"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing_optimizer", "missing_meta", "bad_meta"])
def test_damaged_newest_falls_back_with_a_warning(tmp_path: Path, capsys, damage: str) -> None:
    model = make_model()
    save(tmp_path, 1, model)
    newest = save(tmp_path, 2, model)
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing_optimizer":
        (newest / "optimizer.pt").unlink()
    elif damage == "missing_meta":
        (newest / "meta.json").unlink()
    else:
        (newest / "meta.json").write_text("{not json")
    deep = damage == "flip"  # same size: only the checksum sees it
    assert checkpoint.find_checkpoint(tmp_path, deep=deep) == tmp_path / "step_000001"
    err = capsys.readouterr().err
    assert "step_000002" in err and err.startswith("warning: ") and len(err.strip().splitlines()) == 1
    if not deep:
        with pytest.raises(UserError, match="damaged"):
            checkpoint.resolve_checkpoint(newest)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    step_dir = save(tmp_path, 1, make_model())
    (step_dir / "train_state.pt").unlink()
    with pytest.raises(UserError, match="every checkpoint"):
        checkpoint.find_checkpoint(tmp_path)


class Payload:
    """Unpickling this would create a file: the attack a downloaded checkpoint could carry."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("file", ["train_state.pt", "optimizer.pt"])
def test_crafted_pickle_executes_nothing(tmp_path: Path, file: str) -> None:
    step_dir = save(tmp_path / "run", 3, make_model())
    marker = tmp_path / "pwned"
    with open(step_dir / file, "wb") as f:
        pickle.dump({"step": 3, "evil": Payload(str(marker))}, f)
    with pytest.raises(UserError) as e:
        checkpoint.load_train_state(step_dir)
    assert not marker.exists()
    assert "refusing to load" in str(e.value) and "\n" not in str(e.value)


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_litter(tmp_path: Path, monkeypatch) -> None:
    model = make_model()
    first = save(tmp_path, 1, model)
    before = {p.name: sha(p) for p in first.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_weights", full_disk)
    with pytest.raises(UserError) as e:
        save(tmp_path, 1, model)  # re-saving the same step must not destroy the old one either
    assert "No space left" in str(e.value) and "--save_file_name" in str(e.value)
    with pytest.raises(UserError):
        save(tmp_path, 2, model)
    assert {p.name: sha(p) for p in first.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".tmp_step_000004_99999").mkdir()
    (tmp_path / ".tmp_step_000004_99999" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "step_000001").mkdir()
    (tmp_path / ".tmp_old_step_000003_99999").mkdir()  # a re-save of step 3 killed between its two renames
    (tmp_path / ".tmp_old_step_000003_99999" / "meta.json").write_text("{}")
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".tmp_step_000004_99999"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000003"]
    assert (tmp_path / "step_000003" / "meta.json").read_text() == "{}"


def test_run_lock_names_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoint\n"
                               "with checkpoint.run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)], cwd=Path(checkpoint.__file__).parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            with checkpoint.run_lock(tmp_path):
                pass
        assert f"process {holder.pid}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    with checkpoint.run_lock(tmp_path):  # released when its holder dies, however it dies
        pass


def test_run_ownership_record(tmp_path: Path) -> None:
    assert checkpoint.read_run(tmp_path) is None
    run_id = checkpoint.new_run(tmp_path, {"argv": ["--steps", "3"]})
    assert checkpoint.read_run(tmp_path)["run_id"] == run_id
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(UserError, match="unreadable"):
        checkpoint.read_run(tmp_path)


def test_a_moved_run_folder_still_finds_its_tokenizer(tmp_path: Path) -> None:
    tokenizer_file = tmp_path / "tok" / "tokenizer.json"
    tokenizer_file.parent.mkdir()
    tokenizer_file.write_text('{"model": {}}')
    step_dir = save(tmp_path / "run", 1, make_model(), tokenizer_file=tokenizer_file)
    os.rename(tmp_path / "run", tmp_path / "moved")
    tokenizer_file.unlink()
    meta = checkpoint.read_meta(tmp_path / "moved" / step_dir.name)
    assert Path(meta["tokenizer"]["path"]) == (tmp_path / "moved" / step_dir.name / "tokenizer.json").resolve()
    assert json.loads(Path(meta["tokenizer"]["path"]).read_text()) == {"model": {}}


def test_tied_embeddings_stay_tied_after_loading(tmp_path: Path) -> None:
    import dataclasses

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(ARGS, tie_embeddings=True))
    model.init_weights()
    checkpoint.save_checkpoint(tmp_path, 1, model, None, {"model_args": model.args.to_dict()}, {})
    loaded, _ = checkpoint.load_model(tmp_path)
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded.embed.weight, model.embed.weight)
