"""Bad overrides, generated: every one ends in one `error:` line naming the setting, status 2 (or 1
when the memory plan cannot fit), and never an exception escaping to Hydra (a traceback).

Runs in-process, as `run.py` does after Hydra has composed the config (`app.main.main`), on the
demo: a case that validation lets through runs the model (1 token), which is slow but shows the bug.
"""
from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import main as app_main
from app.demo import DEMO_DIR

CONF = DEMO_DIR.parents[1] / "conf"
BASE = ["max_new_tokens=1", "warmup=false", "stream=false", "prompt_ids=[5,6,7]"]
# settings whose value is a number, a list or a choice, and values none of them accepts
NUMERIC = ["max_new_tokens", "max_context", "sampling.temperature", "sampling.top_k", "sampling.top_p",
           "sampling.seed", "placement.expert_budget_gb", "device.memory_gb", "device.reserved_gb",
           "device.threads", "tiers.0.capacity", "tiers.1.group", "tiers.2.capacity"]
CHOICE = ["mode", "placement.policy", "placement.prefetch", "placement.host_compute", "device.expert_dtype",
          "device.compute_dtype", "chat", "warmup", "stream", "chat_template_kwargs", "prefill_buckets",
          "prompt_ids", "prompt"]
NEVER_VALID = ["nan", "inf", "-inf", "abc", "{}", "'1; rm -rf /'", "[[1]]", "{a: 1}"]
SOMETIMES = ["-1", "0", "1", "1.5", "-0.5", "1e30", "99999999999", "null", "true", "[]", "[3,1]", "[1]", "[64,16]",
             "[0]", "[5000]", "[-3]"]


@pytest.fixture(scope="module")
def conf_dir():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-artifacts")


def run(overrides: list[str], cache) -> tuple[int, str]:
    """(exit status, stderr) of `python run.py OVERRIDES`, in-process, converting into `cache`."""
    try:
        cfg = compose("config", overrides=[f"artifact_cache={cache}"] + BASE + overrides)
    except ConfigCompositionException as err:  # Hydra's own: run.py prints this message, status 1, no traceback
        return 1, f"error: {err}"
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            app_main.main(cfg)
            status = 0
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()


def check(key: str, value: str, status: int, stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if status == 0:
        valid_here = {"chat_template_kwargs": {"{}", "{a: 1}"}}.get(key, set())
        assert value not in set(NEVER_VALID) - valid_here, f"{key}={value} was accepted"
        return
    assert status in (1, 2), f"{key}={value}: status {status}\n{stderr}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"{key}={value}: expected one error line\n{stderr}"
    leaf = key.split(".")[-1]
    assert leaf in errors[0] or key.split(".")[0] in errors[0], f"{key}={value}: the error does not name it: {errors[0]}"


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(NUMERIC + CHOICE), value=st.sampled_from(NEVER_VALID + SOMETIMES))
def test_one_bad_override(conf_dir, cache, key, value):
    status, stderr = run([f"{key}={value}"], cache)
    check(key, value, status, stderr)


SECTIONS = {"": "max_new_tokens", "sampling": "temperature", "placement": "policy", "device": "memory_gb",
            "model": "default_prompt"}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(sorted(SECTIONS)), name=st.one_of(
    st.sampled_from(sorted(SECTIONS.values())).map(lambda s: s[:-1] + "x" if len(s) > 3 else s + "x"),  # typos
    st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)), value=st.sampled_from(["1", "0.5", "abc", "null"]))
def test_an_added_unknown_setting_is_refused_by_name(conf_dir, cache, section, name, value):
    """`+section.name=value` for a name no config file defines: refused (it would be ignored silently)."""
    key = f"{section}.{name}" if section else name
    if name in app_main.settings.known_settings(CONF, app_main.GROUPS).get(section, ()):
        return  # a real setting; the other tests cover values
    status, stderr = run([f"+{key}={value}"], cache)
    assert status == 2, f"+{key}={value}: status {status}\n{stderr}"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in stderr.splitlines() if line.strip()] and len(errors) == 1, stderr
    assert f"unknown setting '{key}'" in errors[0], errors[0]


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.tuples(st.sampled_from(NUMERIC + CHOICE), st.sampled_from(NEVER_VALID + SOMETIMES)),
       second=st.tuples(st.sampled_from(NUMERIC + CHOICE), st.sampled_from(NEVER_VALID + SOMETIMES)))
def test_two_bad_overrides_at_once(conf_dir, cache, first, second):
    """Two overrides together: the run refuses with one error line naming one of them, or runs when both
    are acceptable (never a value from NEVER_VALID, never a traceback)."""
    if first[0] == second[0]:
        return
    status, stderr = run([f"{first[0]}={first[1]}", f"{second[0]}={second[1]}"], cache)
    if status == 0:
        for key, value in (first, second):
            check(key, value, 0, stderr)
        return
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert status in (1, 2) and len(errors) == 1, f"{first} {second}: status {status}\n{stderr}"
    named = [key for key, _ in (first, second) if key.split(".")[-1] in errors[0] or key.split(".")[0] in errors[0]]
    assert named, f"{first} {second}: the error names neither: {errors[0]}"


@pytest.mark.parametrize("override, named", [
    ("nonsense=1", "nonsense"),                    # a key that is not there, without '+'
    ("sampling.temprature=0.5", "temprature"),     # a typo, without '+'
    ("tiers=nope", "nope"),                        # a group option that does not exist
    ("prefill_buckets={}", "prefill_buckets"),     # a mapping where a list is
    ("max_new_tokens=[1", "'[1'"),                # not the override grammar: Hydra quotes the bad input
])
def test_hydra_refuses_what_it_cannot_compose_without_a_traceback(override, named):
    """These fail in Hydra's composition, before Ferry sees the config: Hydra's own message names the
    key, status 1, and no traceback (run.py as a user starts it)."""
    proc = subprocess.run([sys.executable, str(CONF.parent / "run.py"), override, "mode=plan"], cwd=CONF.parent,
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-2000:]
    assert named in output and "Traceback" not in output, output[-2000:]
