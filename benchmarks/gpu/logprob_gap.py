"""The numerical floor under vLLM's weight check (vllm_sampler.TOLERANCE): mean |Δ log p| per sampled token between
runs of the SAME weights that differ only in arithmetic, next to a policy that really differs.

    .venv/bin/python benchmarks/gpu/logprob_gap.py [--model smollm2-135m] [--out FILE.json]   # ~1 min on 2 cores

Completions are sampled from the model (8 prompts × 20 tokens); every comparison is against the bf16 model run one
sequence at a time with sdpa attention, which is what VLLMSampler.check computes on its side.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from altlm import models  # noqa: E402
from altlm.loss import target_logits  # noqa: E402
from altlm.sampler import SampleSettings, inference_model, sample  # noqa: E402
from altlm.template import Template  # noqa: E402

PROMPTS = [
    "The weather today is",
    "Once upon a time",
    "My neighbour said that",
    "I think the government",
    "Yesterday at the store",
    "The best way to learn",
    "He looked at me and",
    "Science tells us",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok, base, tpl = models.load_tokenizer(args.model), models.load_model(args.model), Template()
    enc = [tpl.input_ids(tok, None, p, 64) for p in PROMPTS]
    out = sample(base, tok, tpl, [(None, p) for p in PROMPTS], SampleSettings(1.0, 1.0, 1, 20, 8, 64), seed=3)
    tgts = [tok(s.completion, add_special_tokens=False).input_ids[:20] or [tok.eos_token_id] for s in out]

    @torch.no_grad()
    def logprobs(m, batched=False):
        if batched:  # left-padded together, as the trainer's loss runs them
            lg, t, mk = target_logits(m, enc, tgts, tok.pad_token_id)
            lp = torch.log_softmax(lg.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
            return [lp[i][mk[i]].tolist() for i in range(len(enc))]
        res = []
        for e, t in zip(enc, tgts):
            lg, tt, mk = target_logits(m, [e], [t], tok.pad_token_id)
            res.append(torch.log_softmax(lg.float(), -1).gather(-1, tt.unsqueeze(-1)).squeeze(-1)[mk].tolist())
        return res

    bf16 = inference_model(base, torch.bfloat16)
    ref = logprobs(bf16)
    eager = copy.deepcopy(bf16)
    eager.set_attn_implementation("eager")
    noisy, stale = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in noisy.parameters():  # each weight off by about one bf16 rounding step (2^-9 relative)
            p.mul_(1 + torch.randn(p.shape, generator=g) * 2**-9)
        stale.get_output_embeddings().weight.mul_(1.5)
    cases = {
        "bf16, left-padded batch": logprobs(bf16, batched=True),
        "bf16, eager attention": logprobs(eager),
        "fp32 weights and compute (the old check's reference)": logprobs(inference_model(base, None)),
        "bf16, weights perturbed by ~1 bf16 ulp": logprobs(inference_model(noisy, torch.bfloat16)),
        "bf16, head x1.5 (a policy that differs)": logprobs(inference_model(stale, torch.bfloat16)),
    }
    result = {"model": args.model, "tokens": sum(map(len, ref)), "torch": torch.__version__, "cases": {}}
    for name, lps in cases.items():
        d = [abs(a - b) for ra, rb in zip(ref, lps) for a, b in zip(ra, rb)]
        result["cases"][name] = {"mean": round(sum(d) / len(d), 4), "max": round(max(d), 4)}
        print(f"{name:55s} mean {sum(d) / len(d):.4f}  max {max(d):.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
