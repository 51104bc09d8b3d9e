"""SmolLM2-135M's architecture with random weights, for GPU timing where the 98 MB GGUF cannot be brought.

    python benchmarks/gpu/prepare_model.py export   # here (the offline alias is installed): refresh the spec files
    python benchmarks/gpu/prepare_model.py build OUT  # on the GPU machine: OUT/smollm2-135m-random and
                                                      # OUT/tiny-smollm2-random

`export` copies SmolLM2-135M's config, generation config and tokenizer (what altlm's `smollm2-135m` alias
dequantises to; 3.4 MB, committed in benchmarks/gpu/smollm2-135m-arch/) and writes prompts.txt: the
toxicity-offline recipe's 3,200 fortune prefixes, so the GPU runs need neither the GGUF nor the fortunes package.
`build` draws the weights (torch.manual_seed(0), transformers' own initialisation) and saves two model folders:
the full-size architecture (timings do not depend on weight values) and the smoke recipe's tiny shape
(altlm.models.TINY's sizes), each with the tokenizer. Needs only torch and transformers.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEC = HERE / "smollm2-135m-arch"
FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
# altlm.models.TINY["tiny-smollm2"], repeated so that `build` needs no altlm import (kept equal by a test here)
TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def export() -> None:
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    from altlm import models
    from altlm.config import load_config
    from altlm.data import load_prompts

    assert models.TINY["tiny-smollm2"][1] == TINY, "benchmarks/gpu/prepare_model.py TINY differs from altlm.models.TINY"
    src = Path(models.resolve("smollm2-135m"))
    SPEC.mkdir(exist_ok=True)
    for name in FILES:
        if (src / name).exists():
            shutil.copy2(src / name, SPEC / name)
    split = load_prompts(load_config("toxicity-offline", []))
    prompts = [p for p in [*split.train, *split.eval] if "\n" not in p]
    (HERE / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    print(f"wrote {SPEC} and {HERE / 'prompts.txt'} ({len(prompts)} prompts)")


def build(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SPEC)
    for name, changes in (("smollm2-135m-random", {}), ("tiny-smollm2-random", TINY)):
        target = out / name
        if (target / "config.json").exists():
            print(f"{target} exists")
            continue
        config = AutoConfig.from_pretrained(SPEC)
        for k, v in changes.items():
            setattr(config, k, v)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tmp = out / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
        print(f"{target}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "export":
        export()
    elif len(sys.argv) == 3 and sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        sys.exit("usage: prepare_model.py export | build OUT")
