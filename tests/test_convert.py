"""``oapl-convert`` (oapl_megatron.models.convert): HF → Megatron (TP2·PP2, spawned gloo ranks) → HF is bit-exact
and loads in transformers; resharding keeps every bit; bad inputs fail before any rank starts, naming the file,
tensor or config field; checkpoints of the old format, interrupted conversions and bad ``--run-dir`` arguments are
refused with a message that says why. The round trips are slow (each spawns 4 ranks); the error tests are fast.
Trainer checkpoints → HF: tests/test_checkpoint.py and tests/test_checkpoint_serve.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402

from oapl_megatron.entrypoints.convert import main as convert_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _hf_dir(tmp_path: Path, family: str) -> Path:
    d = tmp_path / f"hf_{family}"
    hf_tiny.save_model(family, d)
    # Tokenizer files must travel with the checkpoint unchanged (contents are opaque to the converter).
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": family}))
    (d / "tokenizer.json").write_text('{"version": "1.0", "marker": "%s"}' % family)
    return d


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_weights(a: Path, b: Path, dtype=None):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for n, t in wa.items():
        want = t if dtype is None else t.to(dtype)
        assert wb[n].dtype == want.dtype and torch.equal(wb[n], want), n


def test_help_imports_no_torch():
    code = ("import sys\nfrom oapl_megatron.entrypoints.convert import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules and 'megatron' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hf-to-mcore" in proc.stdout and "reshard" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2_tied", "qwen3_tied"])
def test_hf_mcore_hf_round_trip_tp2pp2(tmp_path, family):
    import transformers

    hf = _hf_dir(tmp_path, family)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert convert_main(["hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--tp", "2", "--pp", "2"]) == 0
    side = json.loads((ckpt / "oapl_checkpoint.json").read_text())
    assert (side["tp"], side["pp"], side["dtype"], side["arch"]["family"]) == (2, 2, "float32", family.split("_")[0])
    manifest = json.loads((ckpt / "COMPLETE").read_text())  # the trainer's manifest: every file, size and CRC-32
    assert manifest["kind"] == "model" and "oapl_checkpoint.json" in manifest["files"]
    assert all(v["crc32"] is not None for v in manifest["files"].values())
    # Read back at TP1·PP1 in this process (dist_checkpointing reshards on load); small files → sharded output.
    assert convert_main(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--max-shard-size", "30KB"]) == 0
    _assert_same_weights(hf, back)
    assert (back / "model.safetensors.index.json").is_file()
    for f in ("tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        assert (back / f).read_bytes() == (hf / f).read_bytes(), f
    # transformers loads the result as is and computes the same logits as the original.
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(3))
    orig = transformers.AutoModelForCausalLM.from_pretrained(hf)
    conv = transformers.AutoModelForCausalLM.from_pretrained(back)
    assert torch.equal(hf_tiny.hf_logits(orig, ids), hf_tiny.hf_logits(conv, ids))


@pytest.mark.slow
def test_reshard_and_dtype(tmp_path):
    """A bf16 model: the checkpoint is bf16 (megatron keeps the torch-norm weights in fp32, which is exact)."""
    hf = tmp_path / "hf"
    hf_tiny.save_model("qwen3_untied", hf, dtype=torch.bfloat16)
    # Written at TP1·PP1 in process, resharded to TP2 (2 spawned ranks; the vocabulary padding changes from 101 to
    # 102 rows), read back by 2 pipeline workers (rank 0 receives stage 1's bf16 and fp32 tensors and writes).
    assert convert_main(["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "c11")]) == 0
    assert json.loads((tmp_path / "c11" / "oapl_checkpoint.json").read_text())["dtype"] == "bfloat16"
    assert convert_main(["reshard", "--ckpt", str(tmp_path / "c11"), "--out", str(tmp_path / "c21"),
                         "--tp", "2", "--pp", "1"]) == 0
    assert json.loads((tmp_path / "c21" / "oapl_checkpoint.json").read_text())["tp"] == 2
    assert convert_main(["mcore-to-hf", "--ckpt", str(tmp_path / "c21"), "--out", str(tmp_path / "back"),
                         "--workers", "2"]) == 0
    _assert_same_weights(hf, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    assert convert_main(["mcore-to-hf", "--ckpt", str(tmp_path / "c11"), "--out", str(tmp_path / "fp32"),
                         "--dtype", "fp32"]) == 0
    _assert_same_weights(hf, tmp_path / "fp32", dtype=torch.float32)
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------- errors (fast)


def _expect_error(capsys, argv, *fragments):
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    for frag in fragments:
        assert frag in err, (frag, err)


def test_unsupported_architecture(tmp_path, capsys):
    hf = _hf_dir(tmp_path, "llama")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "gemma2"
    (hf / "config.json").write_text(json.dumps(cfg))
    _expect_error(capsys, ["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o")], "model_type", "gemma2")
    assert not (tmp_path / "o").exists()


def test_truncated_file(tmp_path, capsys):
    hf = _hf_dir(tmp_path, "llama")
    f = hf / "model.safetensors"
    os.truncate(f, f.stat().st_size - 64)
    _expect_error(capsys, ["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o")], str(f), "truncated")


def test_missing_shard_and_missing_tensor(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf_tiny.save_model("qwen2_tied", hf, max_shard_size="20KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    gone = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    (hf / gone).unlink()
    _expect_error(capsys, ["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o")], gone, "incomplete")
    # Drop the tensor from the index instead: the converter names the missing tensor.
    hf_tiny.save_model("qwen2_tied", tmp_path / "hf2", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.3.self_attn.q_proj.bias"]
    (tmp_path / "hf2" / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(capsys, ["hf-to-mcore", "--hf", str(tmp_path / "hf2"), "--out", str(tmp_path / "o2")],
                  "model.layers.3.self_attn.q_proj.bias", "missing")


def test_shape_mismatch_names_tensor_and_file(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf = _hf_dir(tmp_path, "llama")
    sd = load_file(hf / "model.safetensors")
    sd["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(40, 32)
    save_file(sd, hf / "model.safetensors", metadata={"format": "pt"})
    _expect_error(capsys, ["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o")],
                  "model.layers.0.mlp.gate_proj.weight", str(hf / "model.safetensors"), "(40, 32)")


def test_layout_and_output_dir_errors(tmp_path, capsys):
    hf = _hf_dir(tmp_path, "llama")
    _expect_error(capsys, ["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o"), "--pp", "3"],
                  "--pp 3", "num_hidden_layers=4")
    _expect_error(capsys, ["hf-to-mcore", "--hf", str(hf), "--out", str(hf)], "not empty")
    _expect_error(capsys, ["mcore-to-hf", "--ckpt", str(hf), "--out", str(tmp_path / "o")], "oapl_checkpoint.json")


def _side(tmp_path: Path, version: int, **files) -> Path:
    d = tmp_path / f"ckpt_v{version}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "metadata.json").write_text("{}")
    (d / "oapl_checkpoint.json").write_text(json.dumps({"format_version": version}))
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def test_old_format_and_interrupted_checkpoints_are_refused(tmp_path, capsys):
    # format 1 (converter output before the trainer and the converter shared one layout): a clear refusal
    _expect_error(capsys, ["mcore-to-hf", "--ckpt", str(_side(tmp_path, 1)), "--out", str(tmp_path / "o")],
                  "format_version 1", "this code reads 2", "oapl-convert hf-to-mcore")
    # a sidecar but no COMPLETE manifest: an interrupted conversion or save
    _expect_error(capsys, ["reshard", "--ckpt", str(_side(tmp_path, 2)), "--out", str(tmp_path / "o"), "--tp", "1",
                           "--pp", "1"], "COMPLETE is missing", "not a complete checkpoint")
    assert not (tmp_path / "o").exists()


def test_run_dir_errors(tmp_path, capsys):
    _expect_error(capsys, ["mcore-to-hf", "--run-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                  "no config.yaml", "not a run directory")
    (tmp_path / "config.yaml").write_text("checkpoint:\n  dir: null\n  every_steps: 0\n")
    (tmp_path / "checkpoints" / ".tmp_step_00000004").mkdir(parents=True)  # a save in progress: left alone
    _expect_error(capsys, ["mcore-to-hf", "--run-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                  f"no complete checkpoint under {tmp_path / 'checkpoints'}")
    assert (tmp_path / "checkpoints" / ".tmp_step_00000004").is_dir()
    with pytest.raises(SystemExit):  # one source only
        convert_main(["mcore-to-hf", "--run-dir", str(tmp_path), "--ckpt", str(tmp_path), "--out", "o"])
