"""Random checkpoints written without transformers load in transformers and in Ferry alike."""
import numpy as np
import pytest
import torch
from transformers import Qwen3_5MoeForCausalLM

from model.checkpoint import Checkpoint
from model.spec import load_spec
from model.synthetic import to_bf16_bits, write_random_checkpoint
from runtime.build import engine_from_checkpoint
from runtime.engine import Buckets


def test_bf16_rounding_is_round_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.005859375, -2.5e-3, 3.0e38], np.float32)
    expected = torch.tensor(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16_bits(values), expected)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_written_checkpoint_matches_transformers(tmp_path, dtype):
    from checkpoints import TinyShape, hf_config
    from model.spec import spec_from_config

    spec = spec_from_config(hf_config(TinyShape(interval=4)).to_dict(), tmp_path)
    model_dir = write_random_checkpoint(spec, tmp_path / "ckpt", dtype=dtype, seed=3)
    assert load_spec(model_dir).num_layers == spec.num_layers
    Checkpoint(model_dir)  # every tensor present, mapped and of the right shape
    oracle = Qwen3_5MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, 40)
    with torch.no_grad():
        reference = oracle(torch.tensor(ids)[None]).logits[0].numpy()
    engine = engine_from_checkpoint(model_dir, buckets=Buckets((16, 64)), max_context=256)
    ours = engine.forward(ids, all_logits=True)
    assert 0.3 < reference.std() < 10
    assert np.abs(ours - reference).max() <= 2e-4


def test_existing_target_is_refused_and_nothing_is_left_on_failure(tmp_path):
    from checkpoints import TinyShape, hf_config
    from model.spec import spec_from_config

    spec = spec_from_config(hf_config(TinyShape()).to_dict(), tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        write_random_checkpoint(spec, tmp_path / "taken")
    with pytest.raises(ValueError, match="BF16 or F32"):
        write_random_checkpoint(spec, tmp_path / "new", dtype="F16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    from checkpoints import TinyShape, hf_config
    from model import synthetic
    from model.spec import spec_from_config

    spec = spec_from_config(hf_config(TinyShape()).to_dict(), tmp_path)
    real_write = synthetic.write_safetensors
    calls = []

    def fail_on_third_shard(path, tensors, dtype):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(path, tensors, dtype)

    monkeypatch.setattr(synthetic, "write_safetensors", fail_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_random_checkpoint(spec, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
