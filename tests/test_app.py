"""run.py end to end: the demo through Hydra overrides, the memory plan, sweeps and their summary, errors.

Runs are subprocesses, as a user starts them. The demo is the trained checkpoint shipped in
models/ferry-demo; its artifacts go to a temporary cache (FERRY_ARTIFACT_CACHE), and every Hydra
output directory is a temporary one, so nothing is written into the home directory or the repository.
"""
import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model.checkpoint import Checkpoint
from model.safetensors_file import read_header
from app import settings
from app.demo import DEMO_DIR
from app.plan import GIB, DeviceProfile, Placement, dense_params, plan_memory
from app.prompting import PromptSource, TextStream, apply_chat_template, prompt_source, shown
from runtime.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DEMO = OmegaConf.load(CONF / "model" / "demo.yaml")
PROMPT_IDS = [37, 5, 211, 90, 400, 17, 3, 64, 99]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """(cache dir, checkpoint dir) of the demo: the artifacts of a session share one cache."""
    return tmp_path_factory.mktemp("demo-cache"), DEMO_DIR


def ferry(args, cwd: Path, cache: Path, module=None, timeout=400) -> subprocess.CompletedProcess:
    """`python run.py ARGS` (or `python -m MODULE ARGS`) in `cwd`; single runs write their Hydra dir there."""
    command = [sys.executable, "-m", module] if module else [sys.executable, str(REPO / "run.py")]
    if module is None and "--multirun" not in args:
        args = [*args, f"hydra.run.dir={cwd / 'out'}"]
    env = {**os.environ, "FERRY_ARTIFACT_CACHE": str(cache / "artifacts"),
           "PYTHONPATH": str(REPO)}
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean(proc: subprocess.CompletedProcess, status: int = 0) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


# ---- the demo checkpoint ----------------------------------------------------------------------------

def test_shipped_demo_is_a_trained_hf_checkpoint():
    """models/ferry-demo: the architecture issue 12 asks for, BF16 within 40 MB, its tokenizer's specials
    where the chat template and generation config expect them, and its records beside it."""
    spec = Checkpoint(DEMO_DIR).spec  # every tensor present, mapped and of the right shape
    assert spec.layer_types == (("linear_attention",) * 3 + ("full_attention",)) * 2
    assert spec.num_experts >= 64 and spec.num_experts_per_tok == 8 and spec.shared_expert_intermediate_size > 0
    weights = sum(p.stat().st_size for p in DEMO_DIR.glob("*.safetensors"))
    assert weights <= 40 * 2**20
    assert {t.dtype for t in read_header(DEMO_DIR / "model.safetensors").values()} == {"BF16"}
    tokenizer = load_tokenizer(DEMO_DIR)
    assert tokenizer.get_vocab_size() == spec.vocab_size
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    text = "def read(path):\n    return open(path).read()  # The ferry carries crates."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert set(spec.eos_token_ids) == {0, 2}
    for name in ("DATA.md", "TRAINING.md", "loss_curve.png", "heldout.txt"):
        assert (DEMO_DIR / name).is_file(), name


def test_chat_template_and_streamed_text(demo):
    _, path = demo
    rendered = apply_chat_template(path, "Where does the ferry go?", {})
    assert rendered == "<|im_start|>user\nWhere does the ferry go?<|im_end|>\n<|im_start|>assistant\n"
    tokenizer = load_tokenizer(path)
    text = "Fähre über den Fluß, 渡し船 🚢 ferry"  # multi-byte characters split over byte-level tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in tokenizer.encode(text).ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert shown("a\x03b\n") == "a\ufffdb\n"


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("from a file\n")
    assert prompt_source("text", None, None, "default") == PromptSource("prompt", text="text")
    assert prompt_source(None, str(tmp_path / "p.txt"), None, None) == PromptSource("prompt_file", text="from a file\n")
    assert prompt_source(None, None, [3, 4], None) == PromptSource("prompt_ids", ids=(3, 4))
    assert prompt_source(None, None, None, "default").origin == "model.default_prompt"
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    for args, message in [(("a", None, [1], None), "not prompt and prompt_ids"), ((None, None, [], None), "non-empty"),
                          ((None, None, [1, -2], None), "non-empty list of token ids"),
                          ((None, str(tmp_path / "bad.txt"), None, None), "not UTF-8"),
                          ((None, None, None, None), "no prompt")]:
        with pytest.raises(settings.ConfigError, match=message):
            prompt_source(*args)


# ---- generation through run.py ----------------------------------------------------------------------

@pytest.mark.slow
def test_prompt_ids_run_writes_a_faithful_record(demo, tmp_path):
    cache, path = demo
    sampled = ["sampling.temperature=0.9", "sampling.top_k=50", "sampling.top_p=0.95", "sampling.seed=3"]
    proc = ferry([f"prompt_ids=[{','.join(map(str, PROMPT_IDS))}]", "max_new_tokens=6", "output_json=record.json",
                  *sampled], tmp_path, cache)
    assert_clean(proc)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record == json.loads((tmp_path / "out" / "metrics.json").read_text())
    generated = record["generated_ids"]
    assert record["prompt_ids"] == PROMPT_IDS and record["prompt_origin"] == "prompt_ids"
    assert len(generated) == 6 or record["stopped_on_eos"]
    assert record["text"] == load_tokenizer(path).decode(generated, skip_special_tokens=False)
    timings = record["timings"]
    assert timings["ttft_s"] > 0 and timings["decode_tokens_per_s"] > 0 and timings["warmup_s"] > 0
    spec = record["model"]["spec"]
    dispatch = record["counters"]["dispatch"]
    routed = (len(PROMPT_IDS) + len(generated) - 1) * spec["num_experts_per_tok"] * spec["num_layers"]
    assert dispatch["expert_tokens"] == sum(t["tokens"] for t in dispatch["tiers"]) == routed  # warm-up not counted
    assert record["choices"]["tiers"] == "default" and record["engine"] == "resident"  # the demo, converted
    assert record["plan"]["fits"] and record["plan"]["slots"] == record["plan"]["total_experts"] == 512
    assert Path(record["model"]["artifact"]).parent == cache / "artifacts"
    memory = record["memory"]  # the plan of both memories (one on the CPU backend) against the measured peak
    assert abs(memory["peak_rss_bytes"] / memory["planned_bytes"] - 1) <= 0.15, memory

    assert record["settings"]["sampling"] == {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 3}

    # the same tokens as the engine driven directly from Python: run.py adds nothing to the numbers
    from runtime.build import engine_from_checkpoint
    from runtime.engine import Buckets
    from runtime.generate import generate
    from runtime.sampling import Sampling

    engine = engine_from_checkpoint(path, buckets=Buckets((16, 64)), max_context=DEMO.max_context)
    sampling = Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=3)
    assert generate(engine, PROMPT_IDS, 6, sampling).token_ids == generated


@pytest.mark.slow
def test_no_arguments_runs_the_demo_and_streams_its_text(demo, tmp_path):
    cache, _ = demo
    proc = ferry([], tmp_path, cache)
    assert_clean(proc)
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["prompt_origin"] == "model.default_prompt" and record["model"]["demo"]
    words = re.findall(r"[A-Za-z]{2,}", record["text"])  # the trained model writes words, not byte soup
    known = set(re.findall(r"[A-Za-z]{2,}", (DEMO_DIR / "heldout.txt").read_text(encoding="utf-8")))
    assert len(words) >= 10 and sum(w in known for w in words) >= 0.9 * len(words), record["text"]
    assert shown(record["text"]) in proc.stdout  # the streamed pieces add up to the whole text
    assert re.search(r"time to first token \d+ ms", proc.stdout)
    assert re.search(r"\[8 x 1\]\s+\d+", proc.stdout)  # the counters table


@pytest.mark.slow
def test_local_hf_directory_with_the_chat_template(demo, tmp_path):
    cache, path = demo
    (tmp_path / "question.txt").write_text("Where does the ferry go?")
    proc = ferry(["+model=local", f"model.path={path}", "chat=true", "prompt_file=question.txt",
                  "max_new_tokens=3", "warmup=false", "output_json=chat.json", "placement.host_compute=[0]"],
                 tmp_path, cache)
    assert_clean(proc)
    record = json.loads((tmp_path / "chat.json").read_text())
    chat = "<|im_start|>user\nWhere does the ferry go?<|im_end|>\n<|im_start|>assistant\n"
    assert record["prompt_ids"] == load_tokenizer(path).encode(chat, add_special_tokens=False).ids
    assert record["model"] == {**record["model"], "name": "local", "demo": False, "path": str(path)}
    assert record["prompt_origin"] == "prompt_file" and record["engine"] == "streamed"
    layers = record["counters"]["offload"]["layers"]  # layer 0's experts ran on the host, the others in slots
    assert layers[0]["host_experts"] > 0 and layers[0]["misses"] == 0
    assert all(layer["host_experts"] == 0 and layer["misses"] > 0 for layer in layers[1:])


@pytest.mark.slow
def test_hf_directory_converts_once_and_artifacts_stream(demo, tmp_path):
    """An HF directory is converted on first use (and said so), reused by the next run; the artifact
    itself then runs resident or streamed, in its own tiers and storage dtype, with no checkpoint."""
    _, path = demo
    cache = tmp_path / "cache"
    ids = f"prompt_ids=[{','.join(map(str, PROMPT_IDS))}]"
    first = ferry(["+model=local", f"model.path={path}", ids, "max_new_tokens=3", "device.expert_dtype=int8",
                   "placement.expert_budget_gb=0.001", "output_json=first.json"], tmp_path, cache)
    assert_clean(first)
    assert "convert   " in first.stdout and "artifact  converted now" in first.stdout
    record = json.loads((tmp_path / "first.json").read_text())
    artifact = Path(record["model"]["artifact"])
    assert artifact.parent == cache / "artifacts" and "-int8-" in artifact.name
    assert record["engine"] == "streamed" and record["settings"]["expert_dtype"] == "int8"
    assert record["counters"]["offload"]["total"]["misses"] > 0
    again = ferry(["+model=local", f"model.path={path}", ids, "max_new_tokens=3", "device.expert_dtype=int8",
                   "placement.expert_budget_gb=0.001", "output_json=again.json"], tmp_path, cache)
    assert_clean(again)
    assert "convert   " not in again.stdout and f"artifact  cached: {artifact}" in again.stdout
    assert json.loads((tmp_path / "again.json").read_text())["generated_ids"] == record["generated_ids"]

    resident = ferry(["+model=local", f"model.path={artifact}", ids, "max_new_tokens=3", "tiers=coarse",
                      "output_json=art.json"], tmp_path, cache)
    assert_clean(resident)
    run = json.loads((tmp_path / "art.json").read_text())
    assert run["engine"] == "resident" and run["model"]["artifact"] == str(artifact)
    assert len(run["settings"]["tiers"]) == 3  # the artifact's own tiers, not tiers=coarse
    assert run["generated_ids"] == record["generated_ids"]
    assert run["text"] == load_tokenizer(path).decode(record["generated_ids"], skip_special_tokens=False)
    assert len(list((cache / "artifacts").glob("*/manifest.json"))) == 1  # nothing converted again

    # the artifact carries the tokenizer and its chat template: a text prompt and a chat need nothing else
    chat = ferry(["+model=local", f"model.path={artifact}", "chat=true", "prompt=Where does the ferry go?",
                  "max_new_tokens=2", "output_json=chat.json"], tmp_path, cache)
    assert_clean(chat)
    rendered = "<|im_start|>user\nWhere does the ferry go?<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((tmp_path / "chat.json").read_text())["prompt_ids"] == \
        load_tokenizer(path).encode(rendered, add_special_tokens=False).ids
    with open(artifact / "tokenizer" / "tokenizer.json", "r+b") as f:  # a changed byte is refused, by name
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    tampered = ferry(["+model=local", f"model.path={artifact}", "prompt=hi", "max_new_tokens=1"], tmp_path, cache)
    assert_clean(tampered, 1)
    assert "tokenizer/tokenizer.json: SHA-256" in tampered.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher,plugin", [("submitit_local", "hydra_plugins.hydra_submitit_launcher"),
                                             ("ray", "hydra_plugins.hydra_ray_launcher")])
def test_sweep_on_a_cluster_launcher(demo, tmp_path, launcher, plugin):
    """The README's cluster commands, locally: submitit's local executor and a local Ray instance each
    run a 2 x 2 sweep; each job writes its record, and neither tiers nor budget changes a token."""
    pytest.importorskip(plugin, reason=f"pip install -e '.[test]' brings {plugin}")
    cache, _ = demo
    sweep = tmp_path / "sweep"
    extra = ["+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false"] \
        if launcher == "ray" else []
    proc = ferry(["--multirun", f"hydra/launcher={launcher}", *extra, "tiers=default,coarse",
                  "placement.expert_budget_gb=0.02,0.05", "max_new_tokens=2", "warmup=false",
                  f"prompt_ids=[{','.join(map(str, PROMPT_IDS))}]", f"hydra.sweep.dir={sweep}"], tmp_path, cache,
                 timeout=900)
    assert_clean(proc)
    records = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(records) == [0, 1, 2, 3]
    assert {r["choices"]["hydra/launcher"] for r in records.values()} == {launcher}
    assert len({tuple(r["generated_ids"]) for r in records.values()}) == 1


@pytest.mark.slow
def test_multirun_sweep_and_its_summary(demo, tmp_path):
    cache, _ = demo
    sweep = tmp_path / "sweep"
    # the demo's 512 experts take 48 MiB in FP32: 0.02 GiB holds 218 of them, 0.05 GiB all
    proc = ferry(["--multirun", "tiers=default,coarse", "placement.expert_budget_gb=0.02,0.05", "max_new_tokens=3",
                  "warmup=false", "placement.prefetch=true", f"prompt_ids=[{','.join(map(str, PROMPT_IDS))}]",
                  f"hydra.sweep.dir={sweep}"], tmp_path, cache)
    assert_clean(proc)
    records = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(records) == [0, 1, 2, 3]
    for job, record in records.items():
        tiers = "default" if job < 2 else "coarse"
        assert record["choices"]["tiers"] == tiers
        assert len(record["counters"]["dispatch"]["tiers"]) == (3 if tiers == "default" else 2)
        assert record["settings"]["placement"]["expert_budget_gb"] == (0.02, 0.05)[job % 2]
        assert record["plan"]["slots"] == (218, 512)[job % 2] and record["engine"] == "streamed"
        offload = record["counters"]["offload"]
        assert offload["total"]["prefetch_issued"] > 0 and offload["total"]["misses"] > 0
        assert record["generated_ids"] == records[0]["generated_ids"]  # neither tiers nor budgets change tokens
    for small, large in ((0, 1), (2, 3)):  # a smaller pool streams more
        streamed = [records[j]["counters"]["offload"]["bytes_per_token"] for j in (small, large)]
        assert streamed[0] > streamed[1] > 0
    assert proc.stdout.count("job tiers=") == 4  # one line per job, nothing interleaved

    summary = ferry([str(sweep)], REPO, cache, module="app.sweep_summary")
    assert_clean(summary)
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("job,tiers,placement.expert_budget_gb,decode tok/s")
    assert rows[0].endswith("hit %,stall %,MiB streamed/token")
    assert [r.split(",")[:3] for r in rows[1:]] == [["0", "default", "0.02"], ["1", "default", "0.05"],
                                                     ["2", "coarse", "0.02"], ["3", "coarse", "0.05"]]
    plot = ET.parse(sweep / "summary.svg").getroot()
    assert len(plot.findall("{http://www.w3.org/2000/svg}polyline")) == 4  # per panel, one line per tiers option
    assert "| coarse" in summary.stdout


# ---- the memory plan --------------------------------------------------------------------------------

def test_qwen36_dense_parameters_match_the_architecture():
    h, v = 2048, 248320
    shared = 3 * 512 * h + h  # gate, up, down and the sigmoid gate
    common = 2 * h + 256 * h + shared  # two norms, router, shared expert
    attention = (2 * 16 * 256 + 2 * 2 * 256) * h + h * 16 * 256 + 2 * 256
    deltanet = (2 * 16 * 128 + 32 * 128 + 32 * 128 + 2 * 32) * h + 8192 * 4 + 2 * 32 + 128 + h * 32 * 128
    spec = settings.model_spec(OmegaConf.load(CONF / "model" / "qwen36_35b.yaml"), None)
    assert dense_params(spec) == (2 * v * h + h, 40 * common + 10 * attention + 30 * deltanet)
    assert spec.expert_params * 40 * 256 + sum(dense_params(spec)) == pytest.approx(34.66e9, rel=1e-3)


def test_plan_of_qwen36_on_the_310p3(tmp_path):
    proc = ferry(["mode=plan", "+model=qwen36_35b", "device=ascend_310p3"], tmp_path, tmp_path)
    assert_clean(proc)
    out = proc.stdout
    assert "qwen36_35b on ascend_310p3 (24.00 GiB), context 32768 tokens, FP16 compute" in out
    assert re.search(r"dense weights\s+4\.56 GiB\s+2\.45 B params", out)
    # 32768 positions plus the largest prefill bucket's padding rows, as the engine allocates them
    assert re.search(r"KV cache\s+641\.2 MiB\s+10 attention layers x K,V x 32832 rows", out)
    assert re.search(r"DeltaNet state\s+62\.8 MiB\s+30 layers", out)
    assert re.search(r"expert slot pool\s+16\.49 GiB\s+2815 of 10240 experts \(27\.5%\) x 6\.0 MiB", out)
    assert re.search(r"total\s+24\.00 GiB\s+of 24\.00 GiB: fits", out)
    assert "one expert in 262 us at 24 GB/s" in out  # 6.3 MB over PCIe 4.0 x16, as measured in DESIGN.md

    resident = ferry(["mode=plan", "+model=qwen36_35b", "device=ascend_310p3", "placement=resident"], tmp_path, tmp_path)
    assert_clean(resident, status=1)
    assert "needs 67.50 GiB, ascend_310p3 has 24.00 GiB" in resident.stdout
    assert "the largest expert budget that fits is 16.49 GiB (2815 slots)" in resident.stdout


def test_plan_checks_the_host_beside_a_card(tmp_path):
    """A card's plan has a host side of its own (runtime, pinned staging), refused with its figure."""
    proc = ferry(["mode=plan", "+model=qwen36_35b", "device=ascend_310p3", "device.host_memory_gb=1"], tmp_path, tmp_path)
    assert_clean(proc, status=1)
    assert re.search(r"pinned staging\s+96\.0 MiB\s+2 x 8 blocks", proc.stdout)
    assert "the host needs 1.59 GiB beside the device and has 1.00 GiB (device.host_memory_gb)" in proc.stdout
    cpu = ferry(["mode=plan", "+model=qwen36_35b", "device=cpu", "device.expert_dtype=int8"], tmp_path, tmp_path)
    assert_clean(cpu)  # one memory: the pool is what is left of RAM after everything else, the store stays on disk
    assert "host (the same memory)" in cpu.stdout and re.search(r"x 3\.0 MiB int8", cpu.stdout)
    assert "10240 x 3.0 MiB int8 = 30.12 GiB on disk" in cpu.stdout
    # beside int8 experts the dense matrices are FP16 (artifact.dense), 2 bytes a parameter
    assert re.search(r"dense weights\s+3\.61 GiB\s+1\.94 B params, FP16", cpu.stdout)
    fp32 = ferry(["mode=plan", "+model=qwen36_35b", "device=cpu"], tmp_path, tmp_path)
    assert re.search(r"dense weights\s+7\.23 GiB\s+1\.94 B params, FP32", fp32.stdout)


def test_plan_refuses_a_pool_smaller_than_one_launch():
    spec = settings.model_spec(OmegaConf.load(CONF / "model" / "qwen36_35b.yaml"), None)
    device = DeviceProfile("card", "Ascend", 24 * GIB, 2 * GIB, "float16", expert_dtype="fp16")
    tiers = settings.tier_set([{"capacity": 1}, {"capacity": 64, "group": 2}], spec)
    plan = plan_memory(spec, device, Placement(0.02), 4096, 64, tiers, "qwen")
    assert not plan.fits and plan.slots == 3
    assert "holds 3 expert slot(s) of 6.0 MiB; the widest tier launches 8 experts" in plan.problems[0]
    roomy = plan_memory(spec, device, Placement(8), 4096, 64, tiers, "qwen")
    assert roomy.fits and roomy.slots == 8 * GIB // (3 * 512 * 2048 * 2)


# ---- config ----------------------------------------------------------------------------------------

def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_config_option_composes_and_validates(demo):
    _, path = demo
    defaults = OmegaConf.load(CONF / "config.yaml").defaults
    assert defaults[0] == "_self_" and not any("model" in str(d) for d in defaults)
    choices = [[f"{group}={option}"] for group in ("device", "placement", "tiers") for option in options(group)]
    choices += [[f"+model={model}"] + ([f"model.path={path}"] if model == "local" else []) for model in options("model")]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for overrides in [[]] + choices:
            cfg = compose("config", overrides)
            model = cfg.model if "model" in cfg else DEMO
            spec = settings.model_spec(model, DEMO_DIR if model.kind == "demo" else Path(str(model.path)).expanduser())
            settings.device_profile(cfg.device)
            settings.placement(cfg.placement)
            settings.tier_set(cfg.tiers, spec)
            settings.prefill_buckets(cfg.prefill_buckets)
            settings.sampling(cfg.sampling)


def write_tiers(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / "conf" / "tiers").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "tiers" / f"{name}.yaml").write_text(f"# @package _global_\n{body}\n")
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


BAD = [
    (["placement.expert_budget_gb=-1"], 2, "placement.expert_budget_gb must be >= 0, got -1"),
    (["placement.expert_budget_gb=lots"], 2, "must be a size in GiB, 'auto' or 'all'"),
    (["placement.policy=fifo"], 2, "placement.policy must be one of"),
    (["placement.policy=belady"], 2, "placement.policy=belady needs the requests of the future"),
    (["placement.expert_budget_gb=0.0005"], 1, "holds 5 expert slot(s) of 0.1 MiB; the widest tier launches 8"),
    (["tiers.0.capacity=128"], 2, "capacities must be sorted ascending: entry 1 has capacity 8 after 128"),
    (["tiers=[]"], 2, "tiers is a config group"),
    (["device=nosuch"], 1, "Could not find 'device/nosuch'"),
    (["+model=nosuch"], 1, "Could not find 'model/nosuch'"),
    (["model=demo"], 1, "To append to your default list use +model=demo"),
    (["mode=serve"], 2, "mode must be run, plan or predict"),
    (["max_new_tokens=0"], 2, "max_new_tokens must be a positive integer"),
    (["sampling.temperature=-1"], 2, "temperature must be a finite number >= 0"),
    (["sampling.temperature=nan"], 2, "temperature must be a finite number >= 0, got nan"),
    (["sampling.top_k=2.5"], 2, "top_k must be an integer >= 0, got 2.5"),
    (["placement.expert_budget_gb=nan"], 2, "placement.expert_budget_gb must be a finite number, got nan"),
    (["device.memory_gb=inf"], 2, "device.memory_gb must be a finite number, got inf"),
    (["tiers.1.group=100"], 2, "tiers[1] has group 100, more than the model's 64 experts per layer"),
    (["tiers.2.capacity=99999"], 2, "tiers[2] has capacity 99999, more than the largest launch (prefill_buckets: 64"),
    (["output_json=[1]"], 2, "output_json must be a file path or null, got [1]"),
    (["chat={}"], 2, "chat must be true or false, got {}"),
    (["prefill_buckets=[1]"], 2, "prefill_buckets must be a non-empty list of token counts above 1"),
    (["prefill_buckets=[64,16]"], 2, "prefill_buckets must be sorted and distinct"),
    (["prefill_buckets=[16,100]"], 2, "must be below 64 or a multiple of it"),
    (["device=ascend_310p3"], 1, "device=ascend_310p3: MindSpore's Ascend backend needs CANN's runtime (libascendcl.so"),
    (["device=cpu", "device.memory=both"], 2, "device.memory must be one of ['shared', 'apart'] on the CPU backend"),
    (["device=ascend_310p3", "device.memory=shared", "mode=plan"], 2,
     "device.memory must be one of ['apart'] on the Ascend backend, got 'shared'"),
    (["+model=local"], 2, "model.path is required: python run.py +model=local model.path=DIR"),
    (["prompt=hi", "prompt_ids=[1,2]"], 2, "give one of prompt, prompt_file, prompt_ids, not prompt and prompt_ids"),
    (["prompt_file=/no/such/prompt.txt"], 2, "prompt_file=/no/such/prompt.txt: no such file"),
    (["prompt_ids=[5000]"], 2, "prompt_ids [5000] are outside the vocabulary (size 4096)"),
    (["chat=true", "prompt_ids=[1]"], 2, "chat=true needs a text prompt"),
    (["max_context=2"], 2, "the prompt is 3 tokens, longer than max_context=2"),
    (["device.memory_gb=0.5"], 1, "this run does not fit cpu: cpu has 512.0 MiB; everything but the experts takes 521.5 MiB"),
]


@pytest.mark.parametrize("args,status,message", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_overrides_fail_clearly(demo, tmp_path, args, status, message):
    cache, _ = demo
    proc = ferry(args, tmp_path, cache)
    assert_clean(proc, status)
    assert message in proc.stderr


@pytest.mark.parametrize("body,message", [("tiers: []", "tiers is empty"),
                                          ("tiers: [{capacity: 8, group: 2}, {capacity: 1}]", "sorted ascending")])
def test_bad_tier_files_fail_clearly(tmp_path, body, message):
    proc = ferry([write_tiers(tmp_path, "mine", body), "tiers=mine", "mode=plan"], tmp_path, tmp_path)
    assert_clean(proc, 2)
    assert message in proc.stderr


def test_missing_or_wrong_weights_say_what_to_do(demo, tmp_path):
    cache, path = demo
    missing = tmp_path / "nowhere"
    proc = ferry(["+model=qwen36_35b", f"model.path={missing}"], tmp_path, cache)
    assert_clean(proc, 1)
    for text in ("Qwen/Qwen3.6-35B-A3B", f"hf download Qwen/Qwen3.6-35B-A3B --local-dir {missing}",
                 f"python -m convert --model-dir {missing} --out {missing}-ferry --dtype fp16",
                 f"python run.py +model=qwen36_35b model.path={missing}"):
        assert text in proc.stderr
    wrong = ferry(["+model=qwen36_35b", f"model.path={path}", "mode=plan"], tmp_path, cache)
    assert_clean(wrong, 2)
    assert "is not model 'qwen36_35b'" in wrong.stderr and "hidden_size: 2048 vs 128" in wrong.stderr


# ---- sweep summary on recorded metrics -------------------------------------------------------------

def test_summary_reads_streamed_bytes_and_plots_against_the_budget(tmp_path):
    from app.sweep_summary import summarise

    for job, (budget, streamed) in enumerate([(2, 9 * 2**20), (4, 5 * 2**20), (8, 2**20)]):
        record = {"overrides": [f"placement.expert_budget_gb={budget}", "tiers=default"],
                  "prompt_ids": [1, 2, 3],
                  "timings": {"decode_tokens_per_s": 10.0 * budget, "ttft_s": 0.1, "generated_tokens": 7},
                  "counters": {"dispatch": {"tiers": [{"launches": 4, "tokens": 30, "padding": 10}]},
                               "offload": {"bytes_per_token": streamed, "hit_rate": 0.5, "stall_fraction": 0.25}}}
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(record))
    text = summarise(tmp_path)
    rows = [r.split(",") for r in (tmp_path / "summary.csv").read_text().splitlines()]
    assert rows[0][:2] == ["job", "placement.expert_budget_gb"]  # tiers did not vary: not an axis
    assert [r[-3:] for r in rows[1:]] == [["50.0", "25.0", "9"], ["50.0", "25.0", "5"], ["50.0", "25.0", "1"]]
    assert [r[-4] for r in rows[1:]] == ["25.0"] * 3  # padding %
    svg = ET.parse(tmp_path / "summary.svg").getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2  # both panels drawn
    assert "| 2 " in text


def test_ctrl_c_while_generating_exits_cleanly_with_130(demo, tmp_path):
    """SIGINT once graphs run and the prefetch thread streams (MindSpore's own handler would end the
    process with 143 and no message; app/interrupts.py takes SIGINT first)."""
    cache, _ = demo
    command = [sys.executable, str(REPO / "run.py"), "max_new_tokens=400", "placement.expert_budget_gb=0.02",
               "placement.prefetch=true", f"hydra.run.dir={tmp_path / 'out'}"]
    env = {**os.environ, "FERRY_ARTIFACT_CACHE": str(cache / "artifacts"), "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    seen = []
    for line in process.stdout:  # the rule printed just before the generated text
        seen.append(line)
        if line.startswith("-----"):
            break
    else:
        pytest.fail("run.py ended before generating: " + "".join(seen)[-2000:] + process.stderr.read()[-2000:])
    process.stdout.read(1)  # the first streamed text: decode has started
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out + err)[-3000:]
    assert err.rstrip().endswith("interrupted") and "Traceback" not in out + err, (out + err)[-3000:]
