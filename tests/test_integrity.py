"""Damaged artifacts are detected: a bit flipped inside the tensor data of a source model, a
Fisher file, a checkpoint or a fine-tuned model makes reading it fail with an error naming the
file and how to make it again (torch.load alone reads such a file without a word)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from spbench.fisher import load_fisher, save_fisher
from spbench.integrity import DamagedArtifactError, content_digest, load_sealed, save_sealed
from spbench.models import build_model
from spbench.pipeline import load_checkpoint, save_checkpoint
from spbench.train import load_source, save_source


def flip_a_tensor_bit(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's stored bytes."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(path.read_bytes())
    # local header: 30 bytes + name + extra, then the data
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_torch_alone_reads_a_flipped_file_silently(tmp_path):
    """Why the digest is needed: the flipped file loads, with a different tensor."""
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    flip_a_tensor_bit(path)
    loaded = torch.load(path, weights_only=True)
    assert not torch.equal(loaded["w"], torch.arange(1000, dtype=torch.float32))


def test_source_model(tmp_path):
    path = tmp_path / "model.pt"
    model = build_model("demo_resnet", 7, 1)
    save_source(path, model, arch="demo_resnet", in_channels=1, meta={"source": "s"})
    again, blob = load_source(path)
    assert blob["content_sha256"] == content_digest({k: v for k, v in blob.items() if k != "content_sha256"})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    flip_a_tensor_bit(path)
    with pytest.raises(DamagedArtifactError, match=rf"{path} is damaged.*rerun snakemake"):
        load_source(path)


def test_fisher_file(tmp_path):
    path = tmp_path / "fisher.pt"
    save_fisher(path, {"backbone.w": torch.rand(50, 40)}, {"m": 10, "estimator": "exact"})
    fisher, meta = load_fisher(path)
    assert meta == {"m": 10, "estimator": "exact"}
    flip_a_tensor_bit(path)
    with pytest.raises(DamagedArtifactError, match=rf"{path} is damaged"):
        load_fisher(path)


def test_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 3, "model": {"w": torch.randn(64, 64)}, "run_key": "k"})
    assert load_checkpoint(path)["step"] == 3
    flip_a_tensor_bit(path)
    with pytest.raises(DamagedArtifactError, match=rf"{path} is damaged.*start the run afresh"):
        load_checkpoint(path)


def test_a_changed_value_outside_the_tensors_is_detected_too(tmp_path):
    path = tmp_path / "x.pt"
    save_sealed(path, {"a": torch.ones(3), "meta": {"m": 10}})
    blob = torch.load(path, weights_only=True)
    blob["content"]["meta"]["m"] = 11
    torch.save(blob, path)
    with pytest.raises(DamagedArtifactError):
        load_sealed(path)


def test_a_file_not_sealed_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "raw.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(DamagedArtifactError, match="no content digest"):
        load_sealed(path)


def test_digest_covers_dtype_shape_and_order_independence():
    a = {"x": torch.zeros(2, 3), "y": [1, 2.0, "s"]}
    assert content_digest(a) == content_digest({"y": [1, 2.0, "s"], "x": torch.zeros(2, 3)})
    assert content_digest(a) != content_digest({"x": torch.zeros(3, 2), "y": [1, 2.0, "s"]})
    assert content_digest(a) != content_digest({"x": torch.zeros(2, 3, dtype=torch.float64), "y": [1, 2.0, "s"]})
    assert content_digest({"b": torch.zeros((), dtype=torch.int64)})  # 0-d tensors (batch-norm counters)


def test_a_fisher_file_of_another_source_model_is_refused(tmp_path):
    """A fine-tune refuses a Fisher file estimated on another source model (its recorded
    digest of the source differs) before it trains, naming the file and the fix; with the
    Fisher of its own source model the same run goes through."""
    import copy

    import yaml

    from spbench.config import RunSpec, validate_config
    from spbench.pipeline import build_source, compute_fisher, finetune_run, prepare_task_from_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "tiny.yaml").read_text())
    raw["finetune"].update(steps=2, batch_size=8)
    config = validate_config(raw)
    data = tmp_path / "data"
    for task in ("digits-src", "digits-mod3-k5"):
        prepare_task_from_config(config, task, data / task)
    for seed in (0, 1):  # two source models: the same recipe, another seed
        other = copy.deepcopy(config)
        other["sources"]["digits-src"]["pretrain"]["seed"] = seed
        src = tmp_path / f"source{seed}"
        src.mkdir()
        build_source(other, "digits-src", data / "digits-src", src / "model.pt", src / "info.json")
        compute_fisher(other, "digits-src", src / "model.pt", data / "digits-src", src / "fisher.pt")
    spec = RunSpec("digits-src", "digits-mod3-k5", "l2_sp_fisher", {"alpha": 0.1, "beta": 0.01, "lr": 0.01}, 0, 0)

    def run(fisher_of: int, name: str):
        return finetune_run(config, spec, source_model=str(tmp_path / "source0" / "model.pt"),
                            source_info=str(tmp_path / "source0" / "info.json"),
                            target_dir=str(data / "digits-mod3-k5"), source_dir=str(data / "digits-src"),
                            fisher_path=str(tmp_path / f"source{fisher_of}" / "fisher.pt"),
                            record_out=str(tmp_path / name / "record.json"))

    with pytest.raises(DamagedArtifactError, match=r"source1/fisher\.pt was estimated on another .*rerun snakemake"):
        run(1, "mismatched")
    assert not (tmp_path / "mismatched" / "record.json").exists()
    record, _ = run(0, "matched")
    assert record["method"] == "l2_sp_fisher" and (tmp_path / "matched" / "record.json").exists()
