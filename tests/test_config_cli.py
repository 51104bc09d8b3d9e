"""Config parsing/validation and the CLI's handling of bad input (one `altlm:` line on stderr, exit code 2)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import run_altlm

from altlm import config as C
from altlm.config import ALTConfig
from altlm.errors import AltlmError

# --------------------------------------------------------------------------- config, in process


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(AltlmError) as e:
        ALTConfig.from_dict({"learning_rat": 0.1})
    msg = str(e.value)
    assert "'learning_rat'" in msg and "did you mean 'learning_rate'" in msg
    with pytest.raises(AltlmError, match="'itertions'.*'iterations'"):
        C.load_config("smoke", ["itertions=3"])


def test_wrong_type():
    with pytest.raises(AltlmError) as e:
        ALTConfig.from_dict({"iterations": "many"})
    assert "'iterations'" in str(e.value) and "int" in str(e.value) and "many" in str(e.value)
    with pytest.raises(AltlmError, match="'iterations'"):
        ALTConfig.from_dict({"iterations": True})  # a bool is not an int
    with pytest.raises(AltlmError, match="'feedback_words'"):
        ALTConfig.from_dict({"feedback_words": ["a", 3]})
    with pytest.raises(AltlmError, match="'kl_coef'"):
        C.load_config("smoke", ["kl_coef=lots"])
    assert ALTConfig.from_dict({"kl_coef": 1}).kl_coef == 1.0  # ints are fine for floats
    assert isinstance(ALTConfig.from_dict({"kl_coef": 1}).kl_coef, float)


def test_bad_choice_value():
    with pytest.raises(AltlmError) as e:
        ALTConfig.from_dict({"template": "bogus"})
    assert "'template'" in str(e.value) and "tag_separator" in str(e.value) and "quark" in str(e.value)
    with pytest.raises(AltlmError, match="'kl_direction'"):
        C.load_config("smoke", ["kl_direction=forward"])


@pytest.mark.parametrize(
    "data,key",
    [
        ({"feedback_words": ["only one"]}, "feedback_words"),
        ({"exemplar": "Nope"}, "exemplar"),
        ({"prompt_words": [5, 2]}, "prompt_words"),
        ({"template": "prefix", "prefix_format": "no placeholder"}, "prefix_format"),
        ({"iterations": 0}, "iterations"),
        ({"drop_factor": 1.5}, "drop_factor"),
        ({"min_new_tokens": 30, "max_new_tokens": 20}, "min_new_tokens"),
        ({"stage_first_draws": -1}, "stage_first_draws"),
        ({"cache_frozen_gb": -0.5}, "cache_frozen_gb"),
    ],
)
def test_validation(data, key):
    with pytest.raises(AltlmError, match=f"'{key}'"):
        ALTConfig.from_dict(data)


@pytest.mark.parametrize("data,key", [({"eval_every": 0}, "eval_every"), ({"train_steps": -1}, "train_steps")])
def test_validation_of_loop_counts(data, key):
    with pytest.raises(AltlmError, match=f"'{key}'"):
        ALTConfig.from_dict(data)


def test_overrides_parse_as_yaml():
    o = C.parse_overrides(
        [
            "iterations=2",
            "feedback_words=[a,b]",
            "exemplar=null",
            "output_dir=runs/x",
            "eval_all_feedback=false",
            "learning_rate=0.001",
            "prefix_format={feedback} input: ",
        ]
    )
    assert o == {
        "iterations": 2,
        "feedback_words": ["a", "b"],
        "exemplar": None,
        "output_dir": "runs/x",
        "eval_all_feedback": False,
        "learning_rate": 0.001,
        "prefix_format": "{feedback} input: ",
    }
    cfg = C.load_config(
        "smoke", ["iterations=2", "feedback_words=[a,b]", "exemplar=b", "description=123", "output_dir=7"]
    )
    assert cfg.iterations == 2 and cfg.feedback_words == ["a", "b"] and cfg.exemplar_text == "b"
    assert cfg.description == "123" and cfg.output_dir == "7"  # string keys keep their text
    with pytest.raises(AltlmError, match="key=value"):
        C.parse_overrides(["iterations"])


def test_float_override_in_exponent_notation():
    assert C.load_config("smoke", ["learning_rate=1e-4"]).learning_rate == pytest.approx(1e-4)


def test_float_in_recipe_in_exponent_notation(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: tiny-smollm2\nlearning_rate: 1e-4\n")
    assert C.load_config(str(p)).learning_rate == pytest.approx(1e-4)


def test_shipped_recipes_all_load():
    names = sorted(p.stem for p in C.RECIPES_DIR.glob("*.yaml"))
    assert "smoke" in names and C.DEFAULT_RECIPE in names
    for name in names:
        cfg = C.load_config(name)
        data = C.read_yaml(C.RECIPES_DIR / f"{name}.yaml")
        for k, v in data.items():
            assert getattr(cfg, k) == v, (name, k)
    assert C.load_config(None).to_dict() == C.load_config(C.DEFAULT_RECIPE).to_dict()
    assert C.load_config("smoke.yaml").to_dict() == C.load_config("smoke").to_dict()


def test_smoke_recipe_is_tiny():
    cfg = C.load_config("smoke")
    assert cfg.model == "tiny-smollm2" and cfg.iterations == 2


def test_unknown_recipe_suggests():
    with pytest.raises(AltlmError, match="did you mean 'smoke'"):
        C.recipe_path("smok")


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: [1, 2\nmodel: :\n")
    with pytest.raises(AltlmError, match="malformed YAML at line"):
        C.load_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(AltlmError, match="mapping"):
        C.load_config(str(lst))
    typo = tmp_path / "typo.yaml"
    typo.write_text("iteratons: 2\n")
    with pytest.raises(AltlmError, match=f"{typo}.*'iteratons'.*'iterations'"):
        C.load_config(str(typo))


def test_help_config_lists_every_key_with_its_real_default(capsys):
    """`altlm train --help-config`: one line per key a config file may hold, each with the default a config made
    of no keys actually has and a non-empty explanation; every key a shipped recipe sets is among them."""
    import re

    from altlm.cli import main

    assert main(["train", "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = {}
    for line in lines:
        m = re.fullmatch(r"(\w+) \(default (.*?)\): (.+)", line)
        assert m and m.group(3).strip(), line
        got[m.group(1)] = m.group(2)
    default = ALTConfig()
    assert list(got) == list(default.to_dict())  # every key, in the order the config file is written
    assert got == {k: repr(v) for k, v in dataclasses.asdict(default).items()}
    for recipe in sorted(C.RECIPES_DIR.glob("*.yaml")):
        assert set(yaml.safe_load(recipe.read_text())) <= set(got), recipe.name


def test_to_dict_roundtrips_through_yaml():
    cfg = C.load_config("smoke", ["feedback_words=[a,b,c]", "exemplar=b", "learning_rate=0.003"])
    again = ALTConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


# --------------------------------------------------------------------------- the CLI, in a subprocess


def test_dry_run(tmp_path):
    r = run_altlm(
        "train", "--config", "smoke", f"output_dir={tmp_path / 'run'}", "iterations=3", "--dry-run", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "iterations: 3" in r.stdout and "model: tiny-smollm2" in r.stdout and "# plan: 3 iterations" in r.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert list(tmp_path.iterdir()) == []


def test_recipes_lists_shipped(tmp_path):
    r = run_altlm("recipes", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert "smoke" in names and "toxicity-offline" in names


def _write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD = {
    "unknown key": (["train", "--config", "smoke", "learning_rat=0.1"], "did you mean 'learning_rate'"),
    "wrong type": (["train", "--config", "smoke", "iterations=many"], "'iterations' must be int"),
    "bad choice": (["train", "--config", "smoke", "training_mode=half"], "'training_mode'"),
    "missing prompt file": (["train", "--config", "smoke", "prompts=/nonexistent.txt"], "/nonexistent.txt"),
    "empty prompt file": (["train", "--config", "smoke", "prompts=empty.txt"], "no non-empty prompt"),
    "non-UTF-8 prompt file": (["train", "--config", "smoke", "prompts=latin1.txt"], "UTF-8"),
    "unknown model alias": (["train", "--config", "smoke", "model=smolm2-135m"], "did you mean 'smollm2-135m'"),
    "unknown bos_token": (
        ["train", "--config", "smoke", "bos_token=<|nope|>"],
        "'bos_token': '<|nope|>' is not a token",
    ),
    "malformed YAML": (["train", "--config", "bad.yaml"], "malformed YAML"),
    "unknown recipe": (["train", "--config", "smok"], "did you mean 'smoke'"),
    "resume non-run": (["train", "--resume", "notarun"], "not an altlm run folder"),
    "resume without state": (["train", "--resume", "halfrun"], "not an altlm run folder"),
    "generate without checkpoint": (["generate", "--run", "notarun", "hello"], "no checkpoint"),
    "generate --feedback with --model": (
        ["generate", "--model", "tiny-smollm2", "--feedback", "x", "hi"],
        "--feedback needs --run",
    ),
    "generate without prompts": (["generate", "--model", "tiny-smollm2"], "no prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    args, needle = BAD[case]
    _write(tmp_path, "empty.txt", b"\n  \n")
    _write(tmp_path, "latin1.txt", "café au lait\nnaïve\n".encode("latin-1"))
    _write(tmp_path, "bad.yaml", b"iterations: [1, 2\nmodel: :\n")
    (tmp_path / "notarun").mkdir()
    (tmp_path / "halfrun").mkdir()
    (tmp_path / "halfrun" / "config.yaml").write_text(yaml.safe_dump(C.load_config("smoke").to_dict()))
    if args[0] == "train" and "--resume" not in args:
        args = args + [f"output_dir={tmp_path / 'out'}"]
    r = run_altlm(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("altlm: ")
    assert "Traceback" not in r.stderr + r.stdout
    assert needle.lower() in lines[0].lower()


def test_serve_on_a_taken_port_is_one_line(tmp_path):
    from conftest import taken_port

    with taken_port() as port:
        r = run_altlm("serve", "--model", "tiny-smollm2", "--port", str(port), cwd=tmp_path, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"altlm: serve: cannot listen on 127.0.0.1:{port}"), r.stderr
    assert "pick another --port" in lines[0]


def test_ctrl_c_exits_130_with_the_resume_command_that_works(tmp_path):
    """SIGINT mid-run (once the run folder exists): exit 130 and a line with the command to go on; that command
    finishes the run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train_smoke import SMALL

    run = tmp_path / "run"
    p = subprocess.Popen(
        # enough iterations that the run is still going when the signal lands (a 2-iteration smoke run ends in seconds)
        [sys.executable, "-m", "altlm", "train", "--config", "smoke", f"output_dir={run}", "iterations=12", *SMALL],
        cwd=tmp_path,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a pytest started in the background of a non-interactive shell inherits SIGINT ignored: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "state.json").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "state.json").exists(), "the run folder never appeared"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert f"Resume with: altlm train --resume {run}" in err, err[-2000:]
    assert not json.loads((run / "state.json").read_text())["finished"]
    r = run_altlm(*f"train --resume {run}".split(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "state.json").read_text())["finished"] is True


def test_failed_start_leaves_no_run_behind(tmp_path):
    out = tmp_path / "out"
    r = run_altlm("train", "--config", "smoke", "prompts=/nonexistent.txt", f"output_dir={out}", cwd=tmp_path)
    assert r.returncode == 2 and "/nonexistent.txt" in r.stderr
    # Second attempt, same output_dir, the prompt file fixed (still failing later, on a model typo, to stay
    # cheap): it must get as far as the model, not be refused because of the first attempt.
    r = run_altlm(
        "train", "--config", "smoke", "prompts=fortunes", "model=smolm2-135m", f"output_dir={out}", cwd=tmp_path
    )
    assert r.returncode == 2
    assert "unknown model" in r.stderr, r.stderr
