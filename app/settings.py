"""Hydra config -> validated settings. Every error names the config key, the value and what is allowed.

`run.py` turns each part of the composed config into the typed object the runtime takes, here, so
a bad override stops the run before anything is loaded, with one line per problem and no traceback.
"""
from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from artifact.manifest import EXPERT_DTYPES
from model.spec import CheckpointError, ModelSpec, load_spec, spec_from_config
from offload.policies import POLICIES
from offload.tiers import TierSet, from_config
from app.plan import ALL, AUTO, DTYPE_BYTES, GIB, MEMORY_MODELS, DeviceProfile, Placement
from runtime.sampling import Sampling


class ConfigError(ValueError):
    """A config value Ferry cannot run with; the message names the key."""


def plain(node):
    """An OmegaConf node as plain Python containers (interpolations resolved)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def known_settings(conf: Path, groups: tuple[str, ...]) -> dict[str, set[str]]:
    """The setting names the config files define, per section ('' is the top level): the top level's
    and `sampling`'s and `predict`'s from config.yaml, each of `groups`' as the union over that group's option files."""
    top = OmegaConf.load(conf / "config.yaml")
    known = {"": {str(k) for k in top.keys()} - {"defaults"} | {"hydra", *groups},
             "sampling": {str(k) for k in top.sampling.keys()}, "predict": {str(k) for k in top.predict.keys()}}
    for group in groups:
        options = [OmegaConf.load(f) for f in sorted((conf / group).glob("*.yaml"))]
        if options and all(isinstance(option, DictConfig) for option in options):
            known[group] = set().union(*({str(k) for k in option.keys()} for option in options))
    return known


def no_unknown_settings(cfg: DictConfig, known: Mapping[str, set[str]]) -> None:
    """Refuse a key no config file defines (`+sampling.temprature=0.5` would otherwise be ignored
    silently, and the run would sample at the default temperature)."""
    for section, names in known.items():
        node = cfg if not section else cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        for key in node.keys():
            if key in names:
                continue
            where = f"{section}.{key}" if section else str(key)
            close = difflib.get_close_matches(str(key), sorted(names), 1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown setting '{where}': {hint}{section or 'the top level'} takes "
                              f"{', '.join(sorted(names))}")


def _number(value, key: str, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_profile(cfg: Mapping) -> DeviceProfile:
    cfg = plain(cfg)
    dtype = cfg.get("compute_dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ConfigError(f"device.compute_dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r} "
                          "(BF16 is a storage format here: MindSpore's CPU kernels and the 310P3 do not compute in it)")
    memory = cfg.get("memory_gb")
    memory_bytes = _host_memory_bytes() if memory == "auto" else int(_number(memory, "device.memory_gb", False) * GIB)
    reserved = int(_number(cfg.get("reserved_gb", 0), "device.reserved_gb") * GIB)
    bandwidths = {}
    for key in ("h2d_gbps", "memory_gbps"):
        value = cfg.get(key)
        bandwidths[key] = None if value is None else _number(value, f"device.{key}", False)
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"device.threads must be a positive integer or null, got {threads!r}")
    experts = cfg.get("expert_dtype", "fp32")
    if experts not in EXPERT_DTYPES:
        raise ConfigError(f"device.expert_dtype must be one of {list(EXPERT_DTYPES)}, got {experts!r}")
    host = cfg.get("host_memory_gb")  # null: the host is the device (CPU backend)
    host_bytes = None
    if host is not None:
        host_bytes = _host_memory_bytes() if host == "auto" else int(_number(host, "device.host_memory_gb", False) * GIB)
    host_reserved = int(_number(cfg.get("host_reserved_gb", 0), "device.host_reserved_gb") * GIB)
    backend = str(cfg.get("backend"))
    model = cfg.get("memory", "shared" if backend == "CPU" else "apart")
    if model not in MEMORY_MODELS or (backend != "CPU" and model != "apart"):
        allowed = list(MEMORY_MODELS) if backend == "CPU" else ["apart"]
        raise ConfigError(f"device.memory must be one of {allowed} on the {backend} backend, got {model!r} "
                          "(shared: the host is the device, as on MindSpore's CPU backend only)")
    return DeviceProfile(str(cfg.get("name")), backend, memory_bytes, reserved, dtype, **bandwidths,
                         expert_dtype=experts, host_memory_bytes=host_bytes, host_reserved_bytes=host_reserved,
                         memory=model)


def placement(cfg: Mapping) -> Placement:
    cfg = plain(cfg)
    budget = cfg.get("expert_budget_gb")
    if budget not in (AUTO, ALL):
        if isinstance(budget, str) or budget is None:
            raise ConfigError(f"placement.expert_budget_gb must be a size in GiB, '{AUTO}' or '{ALL}', got {budget!r}")
        budget = _number(budget, "placement.expert_budget_gb")
    policy = cfg.get("policy")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ConfigError(f"placement.policy must be one of {sorted(POLICIES)}, got {policy!r}")
    prefetch = cfg.get("prefetch")
    if not isinstance(prefetch, bool):
        raise ConfigError(f"placement.prefetch must be true or false, got {prefetch!r}")
    host = cfg.get("host_compute")
    if isinstance(host, list):
        if not all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in host):
            raise ConfigError(f"placement.host_compute layers must be non-negative integers, got {host}")
        host = tuple(host)
    elif host not in ("never", "auto"):
        raise ConfigError(f"placement.host_compute must be never, auto or a list of layers, got {host!r}")
    return Placement(budget, policy, prefetch, host)


def tier_set(entries, spec: ModelSpec, largest_launch: int | None = None) -> TierSet:
    """The `tiers:` list; entries without a group take the model's experts per token. With
    `largest_launch` (the largest prefill bucket the graphs will be exported for), no capacity may
    exceed it."""
    entries = plain(entries)
    if not isinstance(entries, list):
        raise ConfigError(f"tiers must be a list of {{capacity, group}} entries, got {entries!r}")
    try:
        tiers = from_config(entries, default_group=spec.num_experts_per_tok)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"tiers: {err}") from None
    for i, tier in enumerate(tiers):
        if tier.group > spec.num_experts:
            raise ConfigError(f"tiers[{i}] has group {tier.group}, more than the model's {spec.num_experts} experts "
                              f"per layer: a launch never holds more experts than a layer has; choose at most "
                              f"{spec.num_experts}")
        if largest_launch is not None and tier.capacity > largest_launch:
            raise ConfigError(f"tiers[{i}] has capacity {tier.capacity}, more than the largest launch "
                              f"(prefill_buckets: {largest_launch} tokens): an expert never receives more tokens "
                              f"than a launch holds; choose at most {largest_launch}")
    return tiers


def prefill_buckets(values) -> tuple[int, ...]:
    """Checked by `runtime.engine.Buckets` when the engine is built; here only its shape."""
    values = plain(values)
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 1 for v in values)):
        raise ConfigError(f"prefill_buckets must be a non-empty list of token counts above 1 (a decode step, "
                          f"1 token, is always there), got {values!r}")
    if values != sorted(set(values)):
        raise ConfigError(f"prefill_buckets must be sorted and distinct, got {values}")
    return tuple(values)


def sampling(cfg: Mapping) -> Sampling:
    cfg = plain(cfg)
    unknown = set(cfg) - {"temperature", "top_k", "top_p", "seed"}
    if unknown:
        raise ConfigError(f"sampling has unknown keys {sorted(unknown)}; known: temperature, top_k, top_p, seed")
    try:
        return Sampling(**cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampling: {err}") from None


def switches(cfg: Mapping, keys: tuple[str, ...]) -> None:
    """Top-level on/off settings must be true or false (YAML's `{}` or `0` would read as off)."""
    for key in keys:
        if not isinstance(cfg.get(key), bool):
            raise ConfigError(f"{key} must be true or false, got {plain(cfg.get(key))!r}")


def optional_path(value, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key} must be a file path or null, got {plain(value)!r}")
    return value


def positive_int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def same_model(expected: ModelSpec, found: ModelSpec, where: str, name: str) -> None:
    """`found` (a checkpoint's or artifact's spec) must be the architecture conf/model/NAME.yaml gives."""
    differ = [field for field in expected.to_dict() if field != "eos_token_ids"
              and getattr(expected, field) != getattr(found, field)]
    if differ:
        shown = ", ".join(f"{f}: {getattr(expected, f)} vs {getattr(found, f)}" for f in differ[:4])
        raise ConfigError(f"{where} is not model '{name}' (conf vs found: {shown}); "
                          "point model.path (or model.artifact) at the right directory, or use +model=local")


def model_spec(model: Mapping, path: Path | None) -> ModelSpec:
    """The spec from `model.config` and/or the checkpoint at `path`; both must agree when both exist."""
    from_conf = None
    if model.get("config") is not None:
        try:
            from_conf = spec_from_config(plain(model["config"]), Path(f"conf/model/{model.get('name')}.yaml"))
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
    if path is None or not (path / "config.json").is_file():
        if from_conf is None:
            raise ConfigError(f"model '{model.get('name')}' has no config and no config.json at {path}")
        return from_conf
    found = load_spec(path)
    if from_conf is not None:
        same_model(from_conf, found, f"{path}/config.json", str(model.get("name")))
    return found
