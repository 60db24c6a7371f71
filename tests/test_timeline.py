"""The decode timeline model: its launches are the artifact's graphs, and its clock adds up as stated."""
from __future__ import annotations

import numpy as np
import pytest

from checkpoints import TinyShape, write_checkpoint
from artifact.manifest import TierRecord
from artifact.reader import Artifact
from convert.pipeline import ConvertOptions, convert
from offload.crossings import decode_crossings, decode_launch_count
from offload.tiers import from_config, plan_launches
from offload.timeline import (TimelineProfile, Traffic, decode_launches, predict_decode, predict_prefill, spread_loads,
                              step_launches)

CONTEXT = 40


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model_dir = write_checkpoint(TinyShape(), tmp_path_factory.mktemp("ckpt"))
    out = tmp_path_factory.mktemp("art") / "a"
    convert(model_dir, out, ConvertOptions("int8", (TierRecord(1, 2), TierRecord(4, 2)), (16,), 64), progress=False)
    return Artifact.open(out)


def nbytes(tensor) -> int:
    return int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize


def tiers_of(manifest):
    return from_config([{"capacity": t.capacity, "group": t.group} for t in manifest.tiers])


def profile(**changes) -> TimelineProfile:
    base = dict(name="test", gbps={"attention": 1.0, "deltanet": 1.0, "experts": 1.0, "head": 1.0}, tflops=1e6,
                h2d_gbps=1.0, launch_us=0.0, input_us=0.0, sync_us=0.0, transfer_us=0.0, plan_us=0.0, overlap=True)
    return TimelineProfile(**{**base, **changes})


def test_launches_are_the_artifact_graphs_inputs_and_weights(artifact):
    """Each launch takes as many inputs as its decode graph, and reads its weights' bytes as stored."""
    manifest, spec = artifact.manifest, artifact.spec
    tiers = tiers_of(manifest)
    embed, layers, head = decode_launches(spec, tiers, "int8", manifest.target, CONTEXT)
    assert embed.inputs == len(manifest.graph("embedding", 1).inputs)
    assert head.inputs == len(manifest.graph("last_head", 1).inputs)
    assert head.bytes == nbytes(manifest.graph("last_head", 1).inputs[3])  # the lm_head
    dense = {t.name: t for t in manifest.dense.tensors}
    for layer, (graph, experts) in enumerate(layers):
        kind = spec.layer_types[layer]
        record = manifest.graph("attention" if kind == "full_attention" else "deltanet", 1)
        assert graph.inputs == len(record.inputs)
        weights = sum(nbytes(t) for name, t in dense.items() if name.startswith(f"layers.{layer}."))
        state = graph.bytes - weights  # what the launch reads beside its weights: KV cache or recurrent state
        if kind == "full_attention":
            assert state == 2 * CONTEXT * spec.num_key_value_heads * spec.head_dim * 4
        else:
            assert state == 2 * spec.linear_num_value_heads * spec.linear_key_head_dim * spec.linear_value_head_dim * 4
        assert [e.inputs for e in experts] == [len(manifest.graph("expert_group", 1, t).inputs) for t in manifest.tiers[:1]]
        assert sum(e.bytes for e in experts) == spec.num_experts_per_tok * manifest.experts.block_bytes
    assert 2 + len(layers) + sum(len(e) for _, e in layers) == decode_launch_count(spec, tiers)


def test_with_free_host_a_token_takes_its_reads_at_the_profile_rates(artifact):
    spec, tiers = artifact.spec, tiers_of(artifact.manifest)
    embed, layers, head = decode_launches(spec, tiers, "int8", "cpu", CONTEXT)
    everything = [embed, head] + [g for g, _ in layers] + [e for _, es in layers for e in es]
    prediction = predict_decode(spec, tiers, "int8", "cpu", profile(), CONTEXT)
    assert prediction.ms_per_token == pytest.approx(sum(launch.bytes for launch in everything) / 1e9 * 1e3)
    assert prediction.host_ms == prediction.copy_ms == prediction.stall_ms == 0.0


def test_host_costs_add_up_when_the_host_waits_for_each_launch(artifact):
    spec, tiers = artifact.spec, tiers_of(artifact.manifest)
    fast = {kind: 1e6 for kind in ("attention", "deltanet", "experts", "head")}  # device time ~0
    host = profile(gbps=fast, launch_us=100.0, input_us=2.0, sync_us=30.0, transfer_us=5.0, plan_us=50.0,
                   overlap=False)
    embed, layers, head = decode_launches(spec, tiers, "int8", "cpu", CONTEXT)
    launches = [embed, head] + [g for g, _ in layers] + [e for _, es in layers for e in es]
    transfers = sum(n for _, n, _ in decode_crossings(spec, tiers, greedy=True).values())
    expected_us = (sum(100.0 + 2.0 * launch.inputs for launch in launches) + 30.0 * (spec.num_layers + 1)
                   + 5.0 * transfers + 50.0 * spec.num_layers)
    prediction = predict_decode(spec, tiers, "int8", "cpu", host, CONTEXT)
    assert prediction.host_ms == pytest.approx(expected_us / 1e3)
    assert prediction.ms_per_token == pytest.approx(expected_us / 1e3, rel=1e-3)


def test_demand_copies_stall_the_launch_and_prefetch_hides_them_behind_compute(artifact):
    spec, tiers = artifact.spec, tiers_of(artifact.manifest)
    block = artifact.manifest.experts.block_bytes
    base = predict_decode(spec, tiers, "int8", "cpu", profile(), CONTEXT)
    demand = predict_decode(spec, tiers, "int8", "cpu", profile(), CONTEXT, Traffic(misses_per_layer=1.0))
    assert demand.copy_ms == pytest.approx(spec.num_layers * block / 1e9 * 1e3)
    assert demand.stall_ms == pytest.approx(demand.copy_ms)  # nothing else runs while a miss copies
    assert demand.ms_per_token == pytest.approx(base.ms_per_token + demand.copy_ms)
    slow = profile(h2d_gbps=1e-3)  # copies far slower than compute: prefetch cannot hide them
    assert (predict_decode(spec, tiers, "int8", "cpu", slow, CONTEXT, Traffic(prefetches_per_layer=1.0)).ms_per_token
            > 10 * base.ms_per_token)
    quick = profile(h2d_gbps=1e6)  # copies far faster than a layer: prefetch hides them
    hidden = predict_decode(spec, tiers, "int8", "cpu", quick, CONTEXT, Traffic(prefetches_per_layer=1.0))
    assert hidden.ms_per_token == pytest.approx(base.ms_per_token, rel=1e-3)
    assert hidden.stall_ms == 0.0


def test_prefill_copies_what_the_pool_does_not_hold_once_per_chunk_and_layer(artifact):
    manifest, spec = artifact.manifest, artifact.spec
    tiers, block = tiers_of(manifest), manifest.experts.block_bytes
    k, rows = spec.num_experts_per_tok, 2.0 * 3 * spec.moe_intermediate_size * spec.hidden_size
    loads = spread_loads(spec, 16)
    assert loads.sum() == 16 * k and loads.max() - loads.min() <= 1
    _, layers, _ = step_launches(spec, tiers, "int8", manifest.target, 64, 16, plan_launches(loads, tiers))
    for graph, experts in layers:  # every routed row computed once, every active expert read once
        assert sum(e.flops for e in experts) == 16 * k * rows
        assert sum(e.bytes for e in experts) == np.count_nonzero(loads) * block
    held = predict_prefill(spec, tiers, "int8", manifest.target, profile(), 40, 16, 64, resident_share=1.0)
    assert held.launches == 3 and held.copies_per_layer == 0 and held.chunk.copy_ms == 0
    assert held.seconds == pytest.approx(3 * held.chunk.ms_per_token / 1e3)
    waited = predict_prefill(spec, tiers, "int8", manifest.target, profile(), 40, 16, 64, 0.25, prefetch=False)
    assert waited.copies_per_layer == pytest.approx(0.75 * np.count_nonzero(loads))
    assert waited.chunk.copy_ms == pytest.approx(spec.num_layers * waited.copies_per_layer * block / 1e9 * 1e3)
    fetched = predict_prefill(spec, tiers, "int8", manifest.target, profile(), 40, 16, 64, 0.25)
    assert fetched.seconds == pytest.approx(held.seconds)  # every copy hidden behind a layer's compute
    assert waited.seconds > held.seconds
    slow = profile(h2d_gbps=0.05)  # copies outlast a layer's compute: prefetch hides only part of them
    held = predict_prefill(spec, tiers, "int8", manifest.target, slow, 40, 16, 64, 1.0)
    waited = predict_prefill(spec, tiers, "int8", manifest.target, slow, 40, 16, 64, 0.25, prefetch=False)
    fetched = predict_prefill(spec, tiers, "int8", manifest.target, slow, 40, 16, 64, 0.25)
    assert held.seconds < fetched.seconds < waited.seconds
