"""The decode timeline model (`offload.timeline`) against measured decode, then its 310P3 prediction.

    python -m bench.timeline            # real width, 4 layers, FP32; 3 rounds
    python -m bench.timeline --qwen-only   # the 310P3 prediction alone (no model run)

Part 1, validation on this machine. Each round, in fresh processes taking turns:
- the CPU profile, measured by component: one layer graph of each kind, one expert-group launch,
  the head (each called alone, repeatedly, at real width: device time = call time minus the host
  cost of a launch), a launch's host cost (fixed and per input, a graph of n inputs as in
  `bench.launch_overhead`), a small read back and a small host array wrapped as an input, the
  dispatcher's host work per layer (its launches replaced by nothing), a block copied into a slot;
- Ferry decoding (`bench/decode.py`'s worker: greedy, every expert resident, then a quarter of the
  experts in slots with decay eviction and prefetch), its ms per token and expert traffic.
The model then predicts each decode from that round's profile and the run's traffic (demand copies
and prefetch copies per layer); printed: predicted / measured per round, and the medians.

Part 2, Qwen3.6-35B-A3B on a 310P3 (`conf/timeline/ascend_310p3.yaml`: every figure with where it
comes from): the expert budget the memory plan leaves on the card (`app.plan`, placement auto),
FP16 and INT8 experts, a decode token at context 4096, demand copies from the budget's hit rate
(the trained demo's decode routing replayed through the slot pool at the same fraction of experts,
decay eviction, as `run.py mode=predict` does: `app.predict`), without prefetch, prefetching the
router's recorded guesses, and bounded by "every miss prefetched in time"; how much each
profile figure moves the prediction (x0.5 and x2); and the time to first token of an 8k prompt
(`offload.timeline.predict_prefill`) in launches of 1024 and 8192 tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
DECODE = Path(__file__).with_name("decode.py")
WORKING_SET = 16  # expert groups (or blocks) per layer the profile cycles through


def _per_call_s(call, calls: int = 15) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_worker(artifact: Path, threads: int) -> dict:
    """This machine's `TimelineProfile` figures, component by component (see the module docstring)."""
    import mindspore as ms

    from bench.launch_overhead import contenders
    from offload.residence import Residence
    from offload.timeline import decode_launches
    from runtime.backend import configure
    from runtime.build import engine_from_artifact

    configure(threads=threads)
    engine = engine_from_artifact(artifact, verify="none")  # a run checks each block once, before these timings
    spec, dispatcher = engine.spec, engine.dispatcher
    tiers = dispatcher.tiers
    engine.next_greedy(list(range(1, 33)))  # compiles the prefill and decode graphs
    engine.next_greedy([5])
    with tempfile.TemporaryDirectory() as scratch:
        small, large = (contenders(n, Path(scratch))["GraphLaunch"] for n in (2, 32))
        t_small, t_large = _per_call_s(small, 300), _per_call_s(large, 300)
    input_s = max(t_large - t_small, 0.0) / 30
    launch_s = max(t_small - 2 * input_s, 0.0)

    def host_cost(inputs: int) -> float:
        return launch_s + inputs * input_s

    rng = np.random.default_rng(0)
    hidden = ms.Tensor.from_numpy(rng.standard_normal((1, spec.hidden_size)).astype(np.float32))
    _, layers, head = decode_launches(spec, tiers, "fp32", "cpu", 33)
    by_kind = {graph.kind: (layer, graph) for layer, (graph, _) in enumerate(layers)}
    cos, sin = ms.Tensor.from_numpy(engine.cos[33:34]), ms.Tensor.from_numpy(engine.sin[33:34])
    length, one = ms.Tensor(33, ms.int32), ms.Tensor(1, ms.int32)
    gbps = {}
    for kind, (layer, graph) in by_kind.items():
        weights, state = engine.layers[layer], engine.state
        if kind == "attention":
            def call(layer=layer, weights=weights):
                engine.graphs.attention(1)(hidden, cos, sin, engine.keys[layer], engine.values[layer], length,
                                           *weights)[0].asnumpy()
        else:
            def call(layer=layer, weights=weights):
                engine.graphs.deltanet(1)(hidden, state.conv[layer], state.recurrent[layer], one, *weights)[0].asnumpy()
        gbps[kind] = graph.bytes / max(_per_call_s(call) - host_cost(graph.inputs), 1e-6) / 1e9
    experts, tier = layers[0][1][0], tiers[0]
    group = engine.graphs.expert_group(tier, 1)
    rows = ms.Tensor.from_numpy(np.zeros((tier.group, tier.capacity), np.int32))
    scale = ms.Tensor.from_numpy(np.full((tier.group, tier.capacity), 1 / tier.group, np.float32))
    counts = ms.Tensor.from_numpy(np.ones(tier.group, np.int32))
    groups = [[(i * tier.group + g) % spec.num_experts for g in range(tier.group)] for i in range(WORKING_SET)]
    picks = iter(range(10**6))

    pool = dispatcher.weights.device_pool

    def expert_call():  # other experts each call, from a set far beyond the CPU's caches, mapped in already
        i = next(picks) % (WORKING_SET * spec.num_layers)
        slots = ms.Tensor.from_numpy(dispatcher.weights.launch_slots(i % spec.num_layers, groups[i // spec.num_layers]))
        group(hidden, hidden, rows, scale, counts, slots, *pool.tensors).asnumpy()

    for _ in range(WORKING_SET * spec.num_layers):  # a decode run's experts are mapped and cached after warm-up
        expert_call()
    gbps["experts"] = experts.bytes / max(_per_call_s(expert_call, 30) - host_cost(experts.inputs), 1e-6) / 1e9
    last = ms.Tensor.from_numpy(np.zeros(1, np.int32))
    head_call = lambda: engine.graphs.last_head(1)(hidden, last, engine.final_norm, engine.lm_head)[1].asnumpy()
    gbps["head"] = head.bytes / max(_per_call_s(head_call) - host_cost(head.inputs), 1e-6) / 1e9
    choice = ms.Tensor.from_numpy(np.zeros((1, spec.num_experts_per_tok), np.int32))
    sync_s = _per_call_s(choice.asnumpy, 1000)
    little = np.zeros(8, np.int32)
    transfer_s = _per_call_s(lambda: ms.Tensor.from_numpy(little), 1000)

    class NoLaunch:  # the dispatcher's host work alone: every expert-group launch returns its hidden input
        def expert_group(self, tier, tokens):
            return lambda hidden, *rest: hidden

    dispatcher.graphs, dispatcher._groups = NoLaunch(), {}
    routing = [rng.choice(spec.num_experts, spec.num_experts_per_tok, replace=False)[None, :] for _ in range(64)]
    weights = np.full((1, spec.num_experts_per_tok), 1 / spec.num_experts_per_tok, np.float32)
    plans = iter(range(10**6))
    plan_s = _per_call_s(lambda: dispatcher.run(0, hidden, hidden, weights, routing[next(plans) % 64]), 60)
    engine.close()
    square = rng.standard_normal((1024, 1024)).astype(np.float32)
    tflops = 2 * 1024**3 / _per_call_s(lambda: square @ square, 10) / 1e12  # numpy's BLAS, FP32
    total = spec.num_layers * spec.num_experts  # the same with a slot pool, every request a hit
    streamed = engine_from_artifact(artifact, Residence(total // 4, total, "decay"), verify="none").dispatcher
    streamed.graphs = NoLaunch()
    for routed in routing:  # the 64 routings' experts fit in the pool: after this pass, all hits
        streamed.run(0, hidden, hidden, weights, routed)
    plan_streamed_s = _per_call_s(lambda: streamed.run(0, hidden, hidden, weights, routing[next(plans) % 64]), 60)
    streamed.close()
    from artifact.reader import Artifact
    from offload.device import DeviceMemory

    source = Artifact.open(artifact, verify="none").experts
    copy_pool = DeviceMemory().expert_pool(source, WORKING_SET * spec.num_layers)  # its pages mapped, as a run's
    copies = iter(range(10**6))

    def copy_one():  # other blocks each call, from a set the page cache holds (a run's warm-up reads them),
        i = next(copies) % (WORKING_SET * spec.num_layers)  # each into its own slot, as a pool spreads them
        copy_pool.fill(i, i % spec.num_layers, i // spec.num_layers * 7 % spec.num_experts)

    for _ in range(WORKING_SET * spec.num_layers):
        copy_one()
    copy_s = _per_call_s(copy_one, 60)
    return {"gbps": gbps, "tflops": tflops, "launch_us": launch_s * 1e6, "input_us": input_s * 1e6,
            "sync_us": sync_s * 1e6, "transfer_us": transfer_s * 1e6, "plan_us": plan_s * 1e6,
            "plan_streamed_us": plan_streamed_s * 1e6, "h2d_gbps": source.block_bytes / copy_s / 1e9}


def cpu_profile(figures: dict, streamed: bool) -> "TimelineProfile":
    from offload.timeline import TimelineProfile

    plan_us = figures["plan_streamed_us" if streamed else "plan_us"]
    return TimelineProfile("cpu (measured)", figures["gbps"], tflops=figures["tflops"], h2d_gbps=figures["h2d_gbps"],
                           launch_us=figures["launch_us"], input_us=figures["input_us"], sync_us=figures["sync_us"],
                           transfer_us=figures["transfer_us"], plan_us=plan_us, overlap=False,
                           copies_overlap=False)


def load_profile(path: Path) -> "TimelineProfile":
    """The profile file, checked as mode=predict checks it (`app.predict.timeline_profile`)."""
    from omegaconf import OmegaConf

    from app.predict import PredictError, timeline_profile

    try:
        return timeline_profile(OmegaConf.load(path))
    except PredictError as err:
        raise SystemExit(f"{path}: {err}") from None


def validate(args) -> None:
    from bench.measure import run_worker
    from bench.realwidth import bench_artifact, real_width_checkpoint, real_width_spec
    from offload.timeline import Traffic, predict_decode
    from offload.tiers import from_config
    from artifact.reader import Artifact

    checkpoint, spec = real_width_checkpoint(args.layers), real_width_spec(args.layers)
    artifact = bench_artifact(checkpoint, "fp32")
    manifest = Artifact.open(artifact, verify="none").manifest
    tiers = from_config([{"capacity": t.capacity, "group": t.group} for t in manifest.tiers])
    common = ["--layers", str(args.layers), "--prompt", "32", "--tokens", str(args.tokens), "--threads",
              str(args.threads), "--policy", "decay"]
    rounds = []
    for _ in range(args.rounds):
        figures = run_worker(Path(__file__), "--worker", "profile", "--artifact", str(artifact),
                             "--threads", str(args.threads))
        resident = run_worker(DECODE, "--worker", "ferry", "--artifact", str(artifact), *common)
        streamed = run_worker(DECODE, "--worker", "ferry", "--artifact", str(artifact), "--pool", "0.25", *common)
        context = 32 + args.tokens // 2
        predicted = {}
        for name, run in (("resident", resident), ("25% in slots", streamed)):
            profile = cpu_profile(figures, streamed=run is streamed)
            traffic = Traffic(run.get("misses_per_token", 0.0) / spec.num_layers,
                              run.get("prefetches_per_token", 0.0) / spec.num_layers)
            predicted[name] = (predict_decode(spec, tiers, "fp32", "cpu", profile, context, traffic), run)
        rounds.append((figures, predicted))
    print(f"part 1: real width, {args.layers} layers, FP32, {args.tokens} greedy tokens after a 32-token prompt, "
          f"{args.threads} threads; {args.rounds} rounds (profile, resident, streamed, taking turns)")
    for i, (figures, predicted) in enumerate(rounds):
        rates = ", ".join(f"{kind} {rate:.1f}" for kind, rate in figures["gbps"].items())
        print(f"  round {i}: profile GB/s {rates}; launch {figures['launch_us']:.0f} us + {figures['input_us']:.1f} "
              f"us/input, sync {figures['sync_us']:.1f} us, transfer {figures['transfer_us']:.1f} us, dispatch "
              f"{figures['plan_us']:.0f} us/layer ({figures['plan_streamed_us']:.0f} with slots), "
              f"copy {figures['h2d_gbps']:.1f} GB/s")
        for name, (p, run) in predicted.items():
            traffic = (f"; {run['misses_per_token']:.1f} misses and {run['prefetches_per_token']:.1f} prefetches "
                       "per token" if run.get("misses_per_token") is not None else "")
            print(f"    {name:13} measured {run['ms_per_token']:6.1f} ms  predicted {p.ms_per_token:6.1f} ms "
                  f"(host {p.host_ms:.1f}, device {p.device_ms:.1f}, copies {p.copy_ms:.1f}, stalls {p.stall_ms:.1f})"
                  f"  predicted/measured {p.ms_per_token / run['ms_per_token']:.2f}{traffic}")
    for name in rounds[0][1]:
        ratios = [predicted[name][0].ms_per_token / predicted[name][1]["ms_per_token"] for _, predicted in rounds]
        print(f"  {name}: predicted/measured median {statistics.median(ratios):.2f} "
              f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")


def qwen_prediction(args) -> None:
    from omegaconf import OmegaConf

    from app.plan import Placement, plan_memory
    from app.predict import PredictSettings, decode_trace, traffic
    from app.settings import device_profile
    from bench.realwidth import CACHE
    from model.spec import spec_from_config
    from offload.timeline import Traffic, predict_decode
    from offload.tiers import from_config

    model = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "qwen36_35b.yaml"), resolve=True)
    spec = spec_from_config(model["config"], CONF / "model" / "qwen36_35b.yaml")
    tier_cfg = OmegaConf.to_container(OmegaConf.load(CONF / "tiers" / "default.yaml"), resolve=True)["tiers"]
    tiers = from_config(tier_cfg, default_group=spec.num_experts_per_tok)
    device = device_profile(OmegaConf.load(CONF / "device" / "ascend_310p3.yaml"))
    profile = load_profile(CONF / "timeline" / "ascend_310p3.yaml")
    trace = decode_trace(PredictSettings("demo", None), CACHE)  # app.predict's: the trained demo's decode routing
    k = spec.num_experts_per_tok
    print(f"\npart 2: Qwen3.6-35B-A3B ({spec.num_layers} layers) on a 310P3, profile conf/timeline/ascend_310p3.yaml, "
          f"greedy decode at context {args.context}")
    for dtype in ("fp16", "int8"):
        plan = plan_memory(spec, device, Placement(policy="decay"), args.context, 64, tiers, "qwen36_35b", dtype)
        fraction = plan.slots / (spec.num_layers * spec.num_experts)
        alone, hit_rate = traffic(trace, plan, "decay", 0, k)
        guessed, guessed_hits = traffic(trace, plan, "decay", k, k)
        cases = {"every expert hits": Traffic(),
                 "no prefetch": alone,
                 f"prefetch {k} guesses": guessed,
                 "every miss prefetched": Traffic(prefetches_per_layer=alone.misses_per_layer)}
        print(f"  {dtype} experts: the plan leaves {plan.slots} slots ({fraction:.0%} of the experts); the trained "
              f"demo's decode routing at that fraction hits {hit_rate:.0%} (decay), {guessed_hits:.0%} prefetching "
              f"the router's {k} guesses for the next layer")
        for name, flow in cases.items():
            p = predict_decode(spec, tiers, dtype, "ascend_310p3", profile, args.context, flow)
            print(f"    {name:22} {p.tokens_per_s:6.1f} tok/s  {p.ms_per_token:6.1f} ms  (host {p.host_ms:.1f}, "
                  f"device {p.device_ms:.1f}, copies {p.copy_ms:.1f}, stalls {p.stall_ms:.1f}; "
                  f"{flow.misses_per_layer:.2f} misses, {flow.prefetches_per_layer:.2f} prefetches per layer)")
        base = predict_decode(spec, tiers, dtype, "ascend_310p3", profile, args.context, alone)
        moves = []
        for field in ("gbps", "tflops", "h2d_gbps", "launch_us", "input_us", "sync_us", "transfer_us", "plan_us"):
            low, high = (predict_decode(spec, tiers, dtype, "ascend_310p3", profile.scaled(field, f), args.context,
                                        alone).tokens_per_s for f in (0.5, 2.0))
            moves.append(f"{field} {low / base.tokens_per_s - 1:+.0%}/{high / base.tokens_per_s - 1:+.0%}")
        print(f"    sensitivity (no prefetch), tok/s change at x0.5/x2 of each figure: {'; '.join(moves)}")
    prefill_prediction(args, spec, tiers, device, profile)


def prefill_prediction(args, spec, tiers, device, profile) -> None:
    """Time to first token of a long prompt: every chunk sweeps nearly every expert of every layer, so
    what the pool does not hold crosses PCIe once per chunk and layer; a larger bucket crosses it less."""
    from app.plan import Placement, plan_memory
    from artifact.manifest import kv_cache_rows
    from offload.timeline import predict_prefill

    prompt = args.prefill
    print(f"\n  prefill of a {prompt}-token prompt (time to first token), routing spread evenly over the experts, "
          f"the pool's share resident, the rest copied per chunk and layer")
    print(f"    {'experts':8}{'bucket':>7}{'slots':>8}{'copies/layer':>13}{'chunk ms':>10}{'(device':>9}{'copies)':>9}"
          f"{'TTFT s':>8}{'tok/s':>8}{'TTFT, copies after router':>27}")
    for dtype in ("fp16", "int8"):
        for bucket in args.buckets:
            context = kv_cache_rows(prompt + 1, bucket)
            plan = plan_memory(spec, device, Placement(policy="decay"), prompt + 1, bucket, tiers, "qwen36_35b", dtype)
            if not plan.fits:
                print(f"    {dtype:8}{bucket:7d}  does not fit: {plan.problems[0]}")
                continue
            share = plan.slots / (spec.num_layers * spec.num_experts)
            fetched = predict_prefill(spec, tiers, dtype, "ascend_310p3", profile, prompt, bucket, context, share)
            waited = predict_prefill(spec, tiers, dtype, "ascend_310p3", profile, prompt, bucket, context, share,
                                     prefetch=False)
            chunk = fetched.chunk
            print(f"    {dtype:8}{bucket:7d}{plan.slots:8d}{fetched.copies_per_layer:13.0f}{chunk.ms_per_token:10.0f}"
                  f"{chunk.device_ms:9.0f}{chunk.copy_ms:9.0f}{fetched.seconds:8.2f}{fetched.tokens_per_s(prompt):8.0f}"
                  f"{waited.seconds:26.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=4096, help="context of the 310P3 decode prediction")
    parser.add_argument("--prefill", type=int, default=8192, help="prompt of the 310P3 prefill prediction")
    parser.add_argument("--buckets", type=int, nargs="+", default=[1024, 8192], help="prefill launch sizes")
    parser.add_argument("--qwen-only", action="store_true", help="skip part 1 (no model run)")
    parser.add_argument("--worker", choices=["profile"], help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "profile":
        print(json.dumps(profile_worker(args.artifact, args.threads)))
        return
    if not args.qwen_only:
        validate(args)
    qwen_prediction(args)


if __name__ == "__main__":
    main()
