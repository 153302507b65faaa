import json

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from backdoor.attacks import make_attack
from backdoor.models import build_model
from backdoor.record import ModelRecord, RecordError, load_record, save_record
from backdoor.tensorfile import TensorFileError, decode, encode

SHAPE = (1, 8, 8)


def make_record(attack_name: str = "badnets", params: dict | None = None):
    params = {"patch_size": 2, "pattern": "checkerboard"} if params is None else params
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("cnn-small", 10, 1, (0.3,), (0.4,))
    with torch.no_grad():  # non-default BN statistics, so the buffers are checked too
        model[1][1].running_mean.uniform_()
    attack = make_attack(attack_name, params, SHAPE, 10)
    record = ModelRecord(arch="cnn-small", num_classes=10, shape=SHAPE, mean=(0.3,), std=(0.4,),
                         dataset="digits", attack=attack_name, attack_params=params, seed=0,
                         recipe={"epochs": 1}, metrics={"acc": 0.9, "asr": 1.0, "ra": 0.0})
    return model, attack, record


@pytest.mark.parametrize("attack_name, params", [("badnets", None), ("blended", {"pattern_seed": 4})])
def test_round_trip(tmp_path, attack_name, params):
    model, attack, record = make_record(attack_name, params)
    save_record(tmp_path / "rec", model, attack, record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]  # no temporary leftovers
    loaded, loaded_attack, loaded_record = load_record(tmp_path / "rec")
    assert loaded_record == record and not loaded.training
    original = model.state_dict()
    assert original.keys() == loaded.state_dict().keys()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    x = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8)
    assert torch.equal(loaded_attack.apply(x), attack.apply(x))
    meta = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert meta["format"] == "sau-model-record/1"
    assert set(meta["sha256"]) == {"model.safetensors", "trigger.safetensors"}


def test_save_replaces_an_existing_record(tmp_path):
    model, attack, record = make_record()
    save_record(tmp_path / "rec", model, attack, record)
    _, blended, blended_record = make_record("blended", {})
    save_record(tmp_path / "rec", model, blended, blended_record)
    assert load_record(tmp_path / "rec")[2].attack == "blended"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]


def test_tampered_file_is_rejected(tmp_path):
    model, attack, record = make_record()
    save_record(tmp_path / "rec", model, attack, record)
    path = tmp_path / "rec" / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(RecordError, match="model.safetensors: sha256 does not match"):
        load_record(tmp_path / "rec")


def test_not_a_record(tmp_path):
    with pytest.raises(RecordError, match="not a model record"):
        load_record(tmp_path)
    with pytest.raises(RecordError, match="not a model record"):
        load_record(tmp_path / "missing")
    (tmp_path / "record.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RecordError, match="format"):
        load_record(tmp_path)
    (tmp_path / "record.json").write_text("{broken")
    with pytest.raises(RecordError, match="record.json: unreadable"):
        load_record(tmp_path)


def test_metadata_that_does_not_fit_the_weights(tmp_path):
    model, attack, record = make_record()
    save_record(tmp_path / "rec", model, attack, record)
    path = tmp_path / "rec" / "record.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(meta | {"num_classes": 7}))
    with pytest.raises(RecordError, match="weights do not fit cnn-small") as info:
        load_record(tmp_path / "rec")
    assert "\n" not in str(info.value)
    path.write_text(json.dumps(meta | {"arch": "vgg"}))
    with pytest.raises(RecordError, match="arch: unknown architecture"):
        load_record(tmp_path / "rec")


TENSORS = {
    "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
    "f64": torch.randn(2, dtype=torch.float64), "i64": torch.arange(6).reshape(2, 3),
    "i32": torch.tensor([-1, 2], dtype=torch.int32), "u8": torch.arange(256, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape and torch.equal(a[key], b[key])


def test_codec_interoperates_with_safetensors():
    assert_same(st_load(encode(TENSORS)), TENSORS)
    assert_same(decode(st_save(TENSORS, metadata={"note": "ok"})), TENSORS)
    assert_same(decode(encode(TENSORS)), TENSORS)
    # Non-contiguous tensors are stored by value.
    transposed = torch.arange(6).reshape(2, 3).t()
    assert torch.equal(decode(encode({"t": transposed}))["t"], transposed)


@pytest.mark.parametrize("blob", [b"", (5).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]",
                                  (4).to_bytes(8, "little") + b"{oops"])
def test_codec_rejects_malformed_headers(blob):
    with pytest.raises(TensorFileError):
        decode(blob)


def test_codec_rejects_offsets_outside_the_data():
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(TensorFileError, match="w: invalid data_offsets"):
        decode(len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(TensorFileError, match="w: data_offsets do not match shape"):
        decode(len(header).to_bytes(8, "little") + header + b"\x00" * 16)
