"""Checkpoints: round trip without pickle, atomic writes, clear errors on corrupt or mismatched files."""

import json
import os
import re
import zipfile

import numpy as np
import pytest

from minillm import backend
from minillm.train import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from minillm.train import checkpoint as checkpoint_module

from train_helpers import make_model, make_trainer


def snapshot(model):
    return {name: backend.to_numpy(value).copy() for name, value in model.state_dict().items()}


def trained(run_dir, steps=3):
    trainer = make_trainer(run_dir, steps=steps, checkpoint_interval=0, eval_interval=0)
    trainer.fit()
    return trainer


def test_round_trip_restores_model_optimizer_rng_and_data(tmp_path):
    trainer = trained(tmp_path)
    expected_params = snapshot(trainer.model)
    expected_state = trainer.optimizer.state_dict()
    expected_draw = backend.random_uniform((5,))              # the stream continues from the checkpoint ...
    expected_batch = trainer.data.get_batch("train", 4)

    fresh = make_trainer(tmp_path, model_seed=99, steps=3)    # different init, fresh optimizer
    assert fresh.resume() == 3
    for name, value in expected_params.items():
        np.testing.assert_array_equal(backend.to_numpy(fresh.model.state_dict()[name]), value)
    state = fresh.optimizer.state_dict()
    assert state["param_groups"] == expected_state["param_groups"]   # lr, betas (a tuple again), decay
    for index, values in expected_state["state"].items():
        assert state["state"][index]["step"] == values["step"] == 3
        np.testing.assert_array_equal(state["state"][index]["exp_avg"], values["exp_avg"])
        np.testing.assert_array_equal(state["state"][index]["exp_avg_sq"], values["exp_avg_sq"])
    np.testing.assert_array_equal(backend.random_uniform((5,)), expected_draw)  # ... after restoring too
    for got, want in zip(fresh.data.get_batch("train", 4), expected_batch):
        np.testing.assert_array_equal(got, want)


def test_files_hold_no_pickle_and_readable_metadata(tmp_path):
    trained(tmp_path)
    metadata = json.loads((tmp_path / "checkpoint.json").read_text())
    assert metadata["format"] == "minillm-checkpoint" and metadata["version"] == 1 and metadata["step"] == 3
    assert metadata["model_config"]["n_layer"] == 2 and metadata["train_config"]["steps"] == 3
    with np.load(tmp_path / metadata["arrays"], allow_pickle=False) as arrays:  # raises if anything is pickled
        names = set(arrays.files)
        assert all(arrays[name].dtype != object for name in names)
    assert "model/wte.weight" in names and "optim/0/exp_avg" in names
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003.npz"]


def test_only_the_latest_arrays_file_is_kept(tmp_path):
    make_trainer(tmp_path, steps=6, checkpoint_interval=2, eval_interval=0).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006.npz"]
    assert load_checkpoint(tmp_path).step == 6


def test_a_failure_while_writing_the_arrays_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = trained(tmp_path)
    before = snapshot(trainer.model)
    trainer.config.steps = 5
    real_savez = np.savez

    def savez_then_crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")   # some bytes reach the temp file ...
        raise OSError("No space left on device")  # ... then the disk fills up

    trainer.train_step()
    monkeypatch.setattr(checkpoint_module.np, "savez", savez_then_crash)
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    monkeypatch.setattr(checkpoint_module.np, "savez", real_savez)
    assert not list(tmp_path.rglob("*.tmp"))   # the temp file is cleaned up
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 3
    for name, value in before.items():
        np.testing.assert_array_equal(loaded.model_state[name], value)


def test_a_failure_before_the_commit_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = trained(tmp_path)
    trainer.config.steps = 5
    trainer.train_step()
    real_replace = os.replace

    def replace_fails_for_the_metadata(src, dst):
        if str(dst).endswith("checkpoint.json"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace_fails_for_the_metadata)
    with pytest.raises(OSError, match="killed"):
        trainer.save()
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert load_checkpoint(tmp_path).step == 3     # the step-4 arrays exist, but nothing names them
    assert (tmp_path / "checkpoints" / "step-000003.npz").is_file()


def test_corrupt_and_missing_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no run directory"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    trained(tmp_path)
    arrays = tmp_path / "checkpoints" / "step-000003.npz"
    data = arrays.read_bytes()

    arrays.write_bytes(data[: len(data) // 2])                    # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path)
    arrays.unlink()
    with pytest.raises(CheckpointError, match="arrays file .* is missing"):
        load_checkpoint(tmp_path)
    arrays.write_bytes(data)

    meta_path = tmp_path / "checkpoint.json"
    meta = meta_path.read_text()
    meta_path.write_text(meta[:100])
    with pytest.raises(CheckpointError, match="corrupt .not valid JSON"):
        load_checkpoint(tmp_path)
    meta_path.write_text(json.dumps({**json.loads(meta), "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99; this minillm reads version 1"):
        load_checkpoint(tmp_path)
    meta_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a minillm checkpoint"):
        load_checkpoint(tmp_path)


def test_a_different_model_config_names_the_fields(tmp_path):
    trained(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    other = make_model(n_layer=3, d_model=32)
    with pytest.raises(CheckpointError, match=r"d_model: checkpoint has 16, given 32; head_dim: checkpoint has 8, "
                                              r"given 16; n_layer: checkpoint has 2, given 3"):
        restore_checkpoint(checkpoint, other, model_config=other.config.to_dict())


def test_a_checkpoint_from_before_a_config_field_existed_still_restores(tmp_path):
    """Fields added to GPTConfig later (rope, GQA, ...) are absent from older checkpoints: not a difference."""
    trained(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    model = make_model()
    for name in ("positions", "norm", "mlp", "mlp_hidden", "n_kv_head", "head_dim", "qk_norm"):
        del checkpoint.metadata["model_config"][name]
    restore_checkpoint(checkpoint, model, model_config=model.config.to_dict())
    del checkpoint.metadata["model_config"]["n_layer"]
    checkpoint.metadata["model_config"]["d_model"] = 32                # a field it has still counts
    with pytest.raises(CheckpointError, match=r"d_model: checkpoint has 32, given 16$"):
        restore_checkpoint(checkpoint, model, model_config=model.config.to_dict())


def test_missing_or_misshaped_arrays_name_the_keys(tmp_path):
    trained(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"size mismatch for wte.weight"):
        restore_checkpoint(checkpoint, make_model(d_model=32), restore_rng=False)
    del checkpoint.model_state["ln_f.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: ln_f.bias"):
        restore_checkpoint(checkpoint, make_model(), restore_rng=False)


def test_save_without_an_optimizer_and_metadata_must_be_json(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, model=model, step=0)
    loaded = load_checkpoint(tmp_path)
    assert loaded.optimizer_state is None and loaded.step == 0
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "b", model=model, step=1, extra={"bad": object()})
    assert not (tmp_path / "b" / "checkpoint.json").exists()
    with zipfile.ZipFile(tmp_path / loaded.metadata["arrays"]) as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())


def _rewrite_arrays(run_dir, change):
    """Apply ``change`` to the checkpoint's arrays {name: array} and write them back in place."""
    path = run_dir / json.loads((run_dir / "checkpoint.json").read_text())["arrays"]
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _rewrite_metadata(run_dir, key, value):
    path = run_dir / "checkpoint.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))


@pytest.mark.parametrize("key, value, expected", [
    ("arrays", None, "a file name"), ("arrays", 5, "a file name"), ("step", "abc", "an integer"),
    ("step", True, "an integer"), ("model_config", [1], "an object"), ("rng_state", None, "an object"),
    ("optimizer", {"x": 1}, r"an object with 'param_groups' \(a list\) and 'scalars' \(an object\)"),
    ("data_state", 5, "an object or null"), ("train_config", "x", "an object"),
])
def test_metadata_entries_of_the_wrong_type_are_named(tmp_path, key, value, expected):
    """A hand-edited or damaged checkpoint.json: one sentence naming the entry, not a TypeError from deep inside."""
    trained(tmp_path, steps=1)
    _rewrite_metadata(tmp_path, key, value)
    with pytest.raises(CheckpointError, match=rf"checkpoint\.json is corrupt: {key!r} is {re.escape(repr(value))}, "
                                              rf"expected {expected}"):
        load_checkpoint(tmp_path)


def test_a_corrupt_random_state_changes_neither_the_model_nor_the_streams(tmp_path):
    trained(tmp_path, steps=1)
    checkpoint = load_checkpoint(tmp_path)
    checkpoint.metadata["rng_state"] = {"seed": 1, "cpu": {"bit_generator": "PCG64", "state": "damaged"}}
    model = make_model(seed=5)
    before, rng_before = snapshot(model), backend.get_rng_state()
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: the saved random-number state is corrupt"):
        restore_checkpoint(checkpoint, model)
    for name, value in snapshot(model).items():
        np.testing.assert_array_equal(value, before[name])
    assert backend.get_rng_state() == rng_before
    checkpoint = load_checkpoint(tmp_path)                          # a sound state, but a model it does not fit
    wider = make_model(d_model=32)
    rng_before = backend.get_rng_state()
    with pytest.raises(CheckpointError, match="size mismatch"):
        restore_checkpoint(checkpoint, wider)
    assert backend.get_rng_state() == rng_before                    # put back, as the model was never changed


@pytest.mark.parametrize("dtype", [np.int64, np.complex64, np.bool_, "<U3"])
def test_arrays_that_are_not_floating_point_are_refused(tmp_path, dtype):
    """Every array minillm saves is floating point; an integer one would be cast silently, a complex one lose
    its imaginary part: a foreign or damaged file, named before anything is restored."""
    trained(tmp_path, steps=1)
    _rewrite_arrays(tmp_path, lambda arrays: arrays.update({"model/wpe.weight": np.ones((16, 16), dtype)}))
    with pytest.raises(CheckpointError, match=rf"step-000001\.npz: model/wpe\.weight has dtype "
                                              rf"{re.escape(str(np.dtype(dtype)))}, not floating point"):
        load_checkpoint(tmp_path)


def test_an_arrays_file_without_the_arrays_its_metadata_lists_is_refused(tmp_path):
    """Optimizer moments missing from the file would otherwise surface as a KeyError inside AdamW, steps later."""
    trained(tmp_path, steps=1)
    _rewrite_arrays(tmp_path, lambda arrays: arrays.pop("optim/3/exp_avg_sq"))
    with pytest.raises(CheckpointError, match=r"step-000001\.npz lacks array\(s\) that checkpoint\.json lists: "
                                              r"optim/3/exp_avg_sq"):
        load_checkpoint(tmp_path)
    metadata = json.loads((tmp_path / "checkpoint.json").read_text())
    del metadata["array_names"]                           # a checkpoint written before the list existed still loads
    (tmp_path / "checkpoint.json").write_text(json.dumps(metadata))
    assert "optim/3/exp_avg_sq" not in load_checkpoint(tmp_path).optimizer_state["state"][3]


def test_the_metadata_file_given_for_the_run_directory_is_named(tmp_path):
    trained(tmp_path, steps=1)
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is a file: give the run directory that holds it "
                                              r"\(here .*\)"):
        load_checkpoint(tmp_path / "checkpoint.json")


def test_a_hugging_face_directory_given_as_a_run_directory_is_named(tmp_path):
    from minillm.weights import save_hf  # noqa: PLC0415

    save_hf(make_model(), tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* \(checkpoint\.json not found\); it holds a "
                                              r"Hugging Face model \(config\.json\): read it with "
                                              r"minillm\.weights\.load_hf"):
        load_checkpoint(tmp_path)
