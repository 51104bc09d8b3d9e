"""Command line: `altlm train | generate | recipes`. Bad input → one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import AltlmError


def _train(args) -> int:
    from . import config as C

    if args.help_config:
        print(C.help_text())
        return 0
    if args.resume:
        cfg_file = Path(args.resume) / "config.yaml"
        if not cfg_file.exists():
            raise AltlmError(f"--resume: '{args.resume}' has no config.yaml; it is not an altlm run folder")
        cfg = C.ALTConfig.from_dict(C.read_yaml(cfg_file) | C.parse_overrides(args.overrides) | {"output_dir": args.resume},
                                    where=str(cfg_file))
    else:
        cfg = C.load_config(args.config, args.overrides)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
        n = cfg.prompts_per_iteration * cfg.samples_per_prompt
        print(f"# plan: {cfg.iterations} iterations × {n} samples, {cfg.train_steps} steps of {cfg.batch_size} "
              f"(global regime) → {cfg.iterations * n} samples, {cfg.iterations * cfg.train_steps} steps")
        return 0
    from .trainer import ALTTrainer

    trainer = ALTTrainer(cfg, resume=bool(args.resume))
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last completed iteration is kept. Resume with: altlm train --resume {cfg.output_dir}", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = s["metric"]
    t = Table(title=f"{m} on {s['eval_prompts']} held-out prompts × {s['eval_samples_per_prompt']} samples ({s['wall_seconds']:.0f} s)")
    for col in ("model", "feedback", f"{m} mean", f"share > 0.5", "dist-2"):
        t.add_column(col)
    row = lambda name, fb, d: t.add_row(name, fb, f"{d[f'{m}_mean']:.4f}", f"{d[f'{m}_gt_0_5']:.4f}", f"{d['dist_2']:.3f}")  # noqa: E731
    row("reference", "(none)", s["reference"])
    for fb, d in s["reference"]["by_feedback"].items():
        row("reference", fb, d)
    if s["final"].get("untagged"):
        row("final", "(none)", s["final"]["untagged"])
    for fb, d in s["final"]["by_feedback"].items():
        row("final", fb + (" (exemplar)" if fb == s["exemplar"] else ""), d)
    Console().print(t)
    pct = lambda x: "n/a" if x is None else f"{-100 * x:+.1f}%"  # noqa: E731
    num = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    red, st = s["reduction"], s["steerability"]
    print(f"exemplar vs untagged reference: {m} mean {pct(red[f'{m}_mean'])}, share > 0.5 {pct(red[f'{m}_gt_0_5'])}; "
          f"steerability: Spearman(feedback rank, {m}) = {num(st['spearman_rho'])}, worst − best feedback = {num(st['gap'])}")


def _generate(args) -> int:
    from . import checkpoint, models
    from .sampler import SampleSettings, inference_model, sample
    from .trainer import autocast_dtype
    from .template import Template

    prompts = list(args.prompts)
    if args.prompts_file:
        from .data import read_prompt_file

        prompts += read_prompt_file(args.prompts_file, "prompt")
    if not prompts:
        raise AltlmError("generate: no prompt given; pass PROMPT arguments or --prompts-file FILE")
    if args.run:
        folder = Path(args.run) / "checkpoint"
        if not folder.exists():
            raise AltlmError(f"generate: '{args.run}' has no checkpoint/ (not a finished altlm run); train it first or pass --model")
        model, tok, meta = checkpoint.load(folder)
        template = Template(**meta["template"])
        feedback = args.feedback if args.feedback is not None else meta["exemplar"]
        if template.style == "quark" and feedback not in meta["feedback_words"]:
            raise AltlmError(f"generate: --feedback must be one of {meta['feedback_words']} for a Quark run")
        suppress = tok.convert_tokens_to_ids(template.new_tokens(meta["feedback_words"])[0])
        s = meta["sampling"]
    else:
        if args.feedback is not None:
            raise AltlmError("generate: --feedback needs --run (a plain --model has no feedback template)")
        model, tok = models.load_model(args.model), models.load_tokenizer(args.model)
        template, feedback, suppress = Template(), None, []
        s = {"temperature": 1.0, "top_p": 0.9, "min_new_tokens": 3, "max_new_tokens": 20, "max_prompt_tokens": 64}
    settings = SampleSettings(s["temperature"], s["top_p"], s["min_new_tokens"], args.max_new_tokens or s["max_new_tokens"],
                              64, s["max_prompt_tokens"])
    requests = [(feedback, p) for p in prompts for _ in range(args.samples)]
    outs = sample(inference_model(model, autocast_dtype("auto", model.device)), tok, template, requests, settings,
                  suppress, seed=args.seed)
    for (fb, p), o in zip(requests, outs):
        if args.json:
            print(json.dumps({"prompt": p, "feedback": fb, "completion": o.completion}))
        else:
            print(f"[{fb or 'no feedback'}] {p}\033[1m{o.completion}\033[0m" if sys.stdout.isatty() else f"[{fb or 'no feedback'}] {p}{o.completion}")
    return 0


def _recipes(args) -> int:
    from .config import RECIPES_DIR, read_yaml

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        desc = read_yaml(path).get("description", "")
        print(f"{path.stem:24s} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="altlm", description="Align language models with textual feedback (ALT).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run all ALT iterations of a recipe")
    t.add_argument("--config", help="recipe file or shipped recipe name (default: toxicity-offline)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last completed iteration")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    t.add_argument("--help-config", action="store_true", help="list every config key with its help")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. output_dir=runs/x iterations=2")
    t.set_defaults(fn=_train)
    g = sub.add_parser("generate", help="sample from a trained run (under its exemplar feedback by default) or a plain model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder (uses its checkpoint and exemplar)")
    src.add_argument("--model", help="model id, alias or folder (no feedback)")
    g.add_argument("--feedback", help="feedback string to condition on (default: the run's exemplar)")
    g.add_argument("--prompts-file", help="file with prompts (.txt one per line, .jsonl with 'prompt')")
    g.add_argument("--samples", type=int, default=1, help="completions per prompt")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON object per completion: prompt, feedback, completion")
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    g.set_defaults(fn=_generate)
    r = sub.add_parser("recipes", help="list shipped recipes")
    r.set_defaults(fn=_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep the terminal for our progress and tables
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AltlmError as e:
        print(f"altlm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
