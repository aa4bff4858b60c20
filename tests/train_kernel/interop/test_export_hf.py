"""`train-kernel export-hf`: the tokenizer goes with the weights (AutoTokenizer loads the folder and
encodes as the data's tokenizer did), from a checkpoint at a local: URI or in S3 (moto), found
through the checkpoint's config.py and the packed data's manifest."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, write_jsonl
from tokenize_stage.text_tokenizers import load_tokenizer
from train_kernel.interop.tokenizer_export import write_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_written_tokenizer_loads_with_auto_tokenizer(tmp_path, kind, hf_tokenizer_json, sentencepiece_model):
    source = hf_tokenizer_json if kind == "hf" else sentencepiece_model
    ours = load_tokenizer(source)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    message = write_tokenizer(ours.identity, tmp_path, 64)
    assert "copied" in message
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids, _ = ours.encode_batch([TEXT])
    assert loaded(TEXT, add_special_tokens=False)["input_ids"] == ids.tolist()
    assert loaded.eos_token_id == ours.identity.eos_id
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == ours.identity.eos_id and config["max_position_embeddings"] == 64


def _packed_with(tokenizer, tmp_path):
    """tokenize-stage and pack-stage as a user runs them, with `tokenizer`."""
    texts = [
        f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 5) for i in range(60)
    ]
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": t} for t in texts])
    run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(tmp_path / "raw"),
        "--output",
        str(tmp_path / "tok"),
        "--tokenizer",
        str(tokenizer),
        "--no-progress",
    )
    run_cli(
        "pack_stage.cli",
        "run",
        "--input",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "packed"),
        "--seq-len",
        "32",
        "--micro-bsz",
        "2",
        "--no-progress",
    )
    return tmp_path / "packed"


@pytest.mark.process
@pytest.mark.server
def test_export_from_local_and_s3_checkpoints_with_the_datas_tokenizer(
    tmp_path, hf_tokenizer_json, s3_server, monkeypatch
):
    import torch

    from tests.train_kernel.checkpoint.helpers import config_text
    from tests.train_kernel.model.helpers import run_single
    from train_kernel.checkpoint.manifest import CheckpointError
    from train_kernel.config import config_from_text
    from train_kernel.interop.commands import export_checkpoint
    from train_kernel.model import InternLM, load_model_state
    from train_kernel.train.trainer import train

    packed = _packed_with(hf_tokenizer_json, tmp_path)
    run_dir = tmp_path / "run"
    text = config_text(run_dir, total_steps=2, checkpoint_every=2, train_folder=str(packed), vocab_size=400)
    train(
        config_from_text(
            text.replace("embed_grad_scale=1,", "embed_grad_scale=1, max_position_embeddings=512,")
        )
    )
    step = run_dir / "ckpt" / "2"

    local = export_checkpoint(f"local:{step}", tmp_path / "hf_local")
    assert any("tokenizer" in line and "copied" in line for line in local), local
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("exports")
    client = s3_server.client()
    for path in step.iterdir():
        client.upload_file(str(path), bucket, f"run/2/{path.name}")
    export_checkpoint(f"boto3:s3://{bucket}/run/2", tmp_path / "hf_s3")

    for out in (tmp_path / "hf_local", tmp_path / "hf_s3"):
        config = json.loads((out / "config.json").read_text())
        assert config["max_position_embeddings"] == 512
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        assert ids == load_tokenizer(hf_tokenizer_json).encode_batch([TEXT])[0].tolist()
        hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        model_config, state = load_model_state(step)
        model = InternLM(model_config).eval()
        model.load_state_dict(state)
        tokens = torch.tensor(ids)
        with torch.no_grad():
            torch.testing.assert_close(
                hf(tokens.view(1, -1)).logits[0], run_single(model, tokens), atol=1e-4, rtol=0
            )

    # A damaged weights file in S3 is named, not exported.
    client.put_object(Bucket=bucket, Key="run/2/model_tp0_pp0.safetensors", Body=b"garbage")
    with pytest.raises(CheckpointError, match="model_tp0_pp0.safetensors has 7 bytes"):
        export_checkpoint(f"boto3:s3://{bucket}/run/2", tmp_path / "hf_bad")
