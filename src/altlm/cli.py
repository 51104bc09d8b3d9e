"""Command line: `altlm train | generate | eval | report | serve | recipes`. Bad input → one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from . import progress
from .errors import AltlmError


def _train(args) -> int:
    from . import config as C

    if args.help_config:
        print(C.help_text())
        return 0
    resume = bool(args.resume)
    if args.resume and args.config:
        # The same command again plus --resume: go on if the run exists, else start it (killed before it began).
        cfg = C.load_config(args.config, args.overrides + [f"output_dir={args.resume}"])
        resume = (Path(args.resume) / "state.json").exists()
    elif args.resume:
        cfg_file = Path(args.resume) / "config.yaml"
        if not cfg_file.exists():
            raise AltlmError(f"--resume: '{args.resume}' has no config.yaml; it is not an altlm run folder")
        cfg = C.ALTConfig.from_dict(
            C.read_yaml(cfg_file) | C.parse_overrides(args.overrides) | {"output_dir": args.resume}, where=str(cfg_file)
        )
    else:
        cfg = C.load_config(args.config, args.overrides)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
        print("\n".join(plan_lines(cfg)))
        return 0
    from .trainer import ALTTrainer

    try:
        summary = ALTTrainer(cfg, resume=resume).train()
    except KeyboardInterrupt:
        # Every write is atomic or transactional, so any moment is a safe point: what was saved is kept.
        if not (Path(cfg.output_dir) / "state.json").exists():
            print("\ninterrupted before the run folder was created; nothing to resume", file=sys.stderr)
        else:
            print(
                f"\ninterrupted; finished sampling batches, scores and the last training snapshot are kept. "
                f"Resume with: altlm train --resume {cfg.output_dir}",
                file=sys.stderr,
            )
        return 130
    print_summary(summary)
    return 0


def plan_lines(cfg) -> list[str]:
    """What a run of `cfg` will do, computed from the config alone (no data or model is loaded): iterations,
    samples, optimiser steps and evaluation. Counts marked ≤ shrink when the training split is smaller."""
    import math

    prompts = min(cfg.prompts_per_iteration, cfg.num_train_prompts)
    n = prompts * cfg.samples_per_prompt
    le = (
        "≤ " if cfg.prompts_per_iteration >= cfg.num_train_prompts or cfg.prompts not in ("fortunes", "journal") else ""
    )
    lines = [
        f"# plan: {cfg.iterations} iterations × {le}{prompts:,} prompts × {cfg.samples_per_prompt} samples = "
        f"{le}{n:,} samples per iteration, {le}{cfg.iterations * n:,} in all ({cfg.feedback_type} feedback"
        f"{' via ' + cfg.scorer if cfg.feedback_type == 'rm' else ' from ' + cfg.judge_model})"
    ]
    if cfg.quantiles == "global":
        steps, sle = cfg.train_steps, ""
        draws = "uniform draws" if cfg.train_draw == "uniform" else "equal draws per feedback string"
        how = f"global regime: {draws} from the pool"
    else:
        # per_prompt: per_bucket rows per bucket per prompt (fewer when a prompt has fewer samples), then one pass
        buckets = 4 if cfg.feedback_type == "lmu" else len(cfg.feedback_words)
        rows = prompts * min(cfg.per_bucket * buckets, cfg.samples_per_prompt)
        steps = (
            math.ceil(rows / cfg.batch_size)
            if not cfg.train_steps
            else min(cfg.train_steps, math.ceil(rows / cfg.batch_size))
        )
        sle = le
        how = f"per_prompt regime: {le}{rows:,} balanced rows, {'one pass' if not cfg.train_steps else f'capped at {cfg.train_steps} steps'}"
    lines.append(
        f"# training: {sle}{steps:,} steps of {cfg.batch_size} per iteration ({how}) → {sle}{cfg.iterations * steps:,} steps, "
        f"{sle}{cfg.iterations * steps * cfg.batch_size:,} sequences"
    )
    evals = [i for i in range(1, cfg.iterations + 1) if i % cfg.eval_every == 0 or i == cfg.iterations]
    words = cfg.eval_feedback or cfg.feedback_words
    lines.append(
        f"# evaluation: {le}{cfg.num_eval_prompts:,} held-out prompts × {cfg.eval_samples_per_prompt} samples after iteration(s) "
        f"{', '.join(map(str, evals[:6]))}{' …' if len(evals) > 6 else ''}; at the end under "
        f"{'every feedback string (' + str(len(words)) + ')' if cfg.eval_all_feedback and cfg.feedback_type != 'lmu' and len(words) > 1 else 'the exemplar only'}"
    )
    return lines


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = s["metric"]
    t = Table(
        title=f"{m} on {s['eval_prompts']} held-out prompts × {s['eval_samples_per_prompt']} samples ({s['wall_seconds']:.0f} s)"
    )
    for col in ("model", "feedback", f"{m} mean", "share > 0.5", "dist-2"):
        t.add_column(col)
    fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731  (None: nothing could be scored)
    row = lambda name, fb, d: t.add_row(
        name, fb, fmt(d[f"{m}_mean"], ".4f"), fmt(d[f"{m}_gt_0_5"], ".4f"), fmt(d["dist_2"], ".3f")
    )  # noqa: E731
    row("reference", "(none)", s["reference"])
    for fb, d in s["reference"]["by_feedback"].items():
        row("reference", fb, d)
    if s["final"].get("untagged"):
        row("final", "(none)", s["final"]["untagged"])
    for fb, d in s["final"]["by_feedback"].items():
        row("final", fb + (" (exemplar)" if fb == s["exemplar"] else ""), d)
    Console(width=None if sys.stdout.isatty() else 200).print(t)  # a log file should not wrap the table
    pct = lambda x: "n/a" if x is None else f"{-100 * x:+.1f}%"  # noqa: E731
    num = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    red, st = s["reduction"], s["steerability"]
    print(
        f"exemplar vs untagged reference: {m} mean {pct(red[f'{m}_mean'])}, share > 0.5 {pct(red[f'{m}_gt_0_5'])}; "
        f"steerability: Spearman(feedback rank, {m}) = {num(st['spearman_rho'])}, worst − best feedback = {num(st['gap'])} "
        f"(both {'> 0' if st.get('steered_sign', 1) > 0 else '< 0'} when the model follows the feedback)"
    )
    print_claims(s.get("claims"))
    ls = s.get("likelihood_steer")
    if ls and ls.get("spearman") is not None:
        print(
            f"likelihood check on {ls['n']} fixed reference texts: Spearman(log p(text | {ls['worst']}) − log p(text | {ls['best']}), "
            f"badness) = {ls['spearman']:.3f} (> 0 when the model follows the feedback; no sampling noise)"
        )


def print_claims(c: dict | None) -> None:
    """Each claim with its estimate, interval and whether it holds (summary.json → claims)."""
    if not c:
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"claims: bootstrap over {c['prompts']} held-out prompts ({c['bootstrap']} resamples); scores {c['sign']}"
    )
    for col in ("claim", "estimate", "interval", "target", "holds"):
        t.add_column(col)
    num = lambda x: "n/a" if x is None else f"{x:+.4f}"  # noqa: E731  (None: undefined, e.g. a constant score)
    for row in c["claims"]:
        lo, hi = row["interval"]
        level = f"{round(row['level'] * 100)}%"
        t.add_row(
            row["claim"],
            num(row["estimate"]),
            f"{level} [{num(lo)}, {num(hi)}]",
            row["target"],
            "yes" if row["holds"] else "NO",
        )
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def _generate(args) -> int:
    from . import checkpoint, models
    from .sampler import SampleSettings, inference_model, sample
    from .models import autocast_dtype
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
            raise AltlmError(
                f"generate: '{args.run}' has no checkpoint/ (not a finished altlm run); train it first or pass --model"
            )
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
    settings = SampleSettings(
        s["temperature"],
        s["top_p"],
        s["min_new_tokens"],
        args.max_new_tokens or s["max_new_tokens"],
        64,
        s["max_prompt_tokens"],
    )
    requests = [(feedback, p) for p in prompts for _ in range(args.samples)]
    started = time.time()
    outs = sample(
        inference_model(model, autocast_dtype("auto", model.device)),
        tok,
        template,
        requests,
        settings,
        suppress,
        seed=args.seed,
    )
    progress.phase("generate", started, samples=len(outs))
    for (fb, p), o in zip(requests, outs):
        if args.json:
            print(json.dumps({"prompt": p, "feedback": fb, "completion": o.completion}))
        else:
            print(
                f"[{fb or 'no feedback'}] {p}\033[1m{o.completion}\033[0m"
                if sys.stdout.isatty()
                else f"[{fb or 'no feedback'}] {p}{o.completion}"
            )
    return 0


def _eval(args) -> int:
    import time

    from . import checkpoint, evaluation, models
    from .config import ALTConfig, load_config, read_yaml
    from .feedback import build_scorer
    from .models import autocast_dtype
    from .sampler import SampleSettings, inference_model
    from .template import Template

    t0 = time.time()
    if args.samples_per_prompt < 1 or args.steer_samples_per_prompt < 0 or args.perplexity_samples_per_prompt < 1:
        raise AltlmError(
            "eval: --samples-per-prompt and --perplexity-samples-per-prompt must be >= 1, --steer-samples-per-prompt >= 0"
        )
    if args.run:
        run = Path(args.run)
        if not (run / "config.yaml").exists():
            raise AltlmError(
                f"eval: '{run}' is not an altlm run folder (no config.yaml); pass the output_dir of `altlm train`"
            )
        if not (run / "checkpoint").exists():
            raise AltlmError(f"eval: '{run}' has no checkpoint/ yet (no iteration finished); train or resume it first")
        cfg = ALTConfig.from_dict(read_yaml(run / "config.yaml"), where=str(run / "config.yaml"))
        prompts = eval_prompts(args, cfg)  # bad input is reported before any model is loaded
        model, tok, meta = checkpoint.load(run / "checkpoint")
        template = Template(**meta["template"])
        suppress = tok.convert_tokens_to_ids(template.new_tokens(meta["feedback_words"])[0])
        vocab, exemplar = meta["feedback_words"], meta["exemplar"]
        reference = cfg.reference_model or meta["model"]
        feedback = args.feedback or [exemplar] + [w for w in vocab if w != exemplar]
        for fb in feedback:
            if template.style == "quark" and fb not in vocab:
                raise AltlmError(f"eval: --feedback {fb!r} is not a token of this Quark run; use one of {vocab}")
        s = meta["sampling"]
        out = Path(args.out) if args.out else run / "eval.json"
    else:
        if args.feedback:
            raise AltlmError("eval: --feedback needs --run (a plain --model has no feedback template)")
        cfg = load_config(None, [])
        prompts = eval_prompts(args, cfg)
        model, tok = models.load_model(args.model), models.load_tokenizer(args.model)
        template, suppress, vocab, feedback, reference = Template(), [], [], [], None
        s = {
            "temperature": cfg.eval_temperature,
            "top_p": cfg.eval_top_p,
            "min_new_tokens": cfg.min_new_tokens,
            "max_new_tokens": cfg.max_new_tokens,
            "max_prompt_tokens": cfg.max_prompt_tokens,
        }
        out = Path(args.out) if args.out else Path("eval.json")
    settings = SampleSettings(
        s["temperature"], s["top_p"], s["min_new_tokens"], s["max_new_tokens"], 128, s["max_prompt_tokens"]
    )
    scorer = build_scorer(args.scorer or cfg.scorer, cfg)
    amp = autocast_dtype("auto", model.device)
    fluency = (
        None
        if args.perplexity_model == "none"
        else evaluation.Fluency(args.perplexity_model, amp, samples_per_prompt=args.perplexity_samples_per_prompt)
    )
    k, k_steer = args.samples_per_prompt, args.steer_samples_per_prompt
    jobs = []
    if args.run and not args.no_reference:
        # the policy's vocabulary, so the suppressed conditioning ids exist
        jobs.append(("reference", checkpoint.base_model(meta, tok, reference), [evaluation.Condition(None, k)]))
    conds = [evaluation.Condition(fb, k if (args.feedback or fb == feedback[0]) else k_steer) for fb in feedback]
    jobs.append(
        ("final" if args.run else args.model, model, [c for c in conds if c.k] or [evaluation.Condition(None, k)])
    )
    results, records = {}, []
    for label, m, cs in jobs:
        results[label], recs = evaluation.evaluate(
            inference_model(m, amp), tok, template, prompts, cs, settings, scorer, suppress, args.seed, label, fluency
        )
        records += recs
    report = {
        "run": args.run,
        "model": args.model,
        "metric": scorer.name,
        "prompts": len(prompts),
        "perplexity_model": None if fluency is None else fluency.name,
        "sampling": s,
        "seed": args.seed,
        "results": results,
        "steerability": {
            **evaluation.steerability(results[jobs[-1][0]], vocab, f"{scorer.name}_mean", scorer.higher_is_better),
            "model": jobs[-1][0],
        },
        "seconds": round(time.time() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    evaluation.write_json(out, report)
    samples_path = out.with_suffix(".samples.jsonl")
    samples_path.unlink(missing_ok=True)
    evaluation.append_jsonl(samples_path, records)
    print_eval(report)
    print(f"wrote {out} and {samples_path} ({report['seconds']:.0f} s)")
    return 0


def eval_prompts(args, cfg) -> list[str]:
    from .data import load_prompts, read_prompt_file

    prompts = read_prompt_file(args.prompts, "prompt") if args.prompts else load_prompts(cfg).eval
    if args.num_prompts:
        prompts = prompts[: args.num_prompts]
    if not prompts:
        raise AltlmError(f"eval: no prompts in {args.prompts or 'the run'}")
    return prompts


def print_eval(ev: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .evaluation import eval_rows

    m = ev["metric"]
    t = Table(title=f"{m} on {ev['prompts']} prompts")
    header, *rows = eval_rows(ev)
    for c in header:
        t.add_column(c)
    for row in rows:
        t.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(t)  # a log file should not wrap the table
    st = ev["steerability"]
    if st["spearman_rho"] is not None or st["gap"] is not None:
        rho = "n/a" if st["spearman_rho"] is None else f"{st['spearman_rho']:.3f}"
        print(
            f"steerability ({st['model']}, {st['metric']}): Spearman(feedback rank, metric) = {rho}, worst − best = {st['gap']:.4f}"
        )


def _report(args) -> int:
    from .report import write_report

    for d in args.runs:
        if not Path(d).is_dir():
            raise AltlmError(f"report: run folder '{d}' does not exist")
    print(f"wrote {write_report([Path(d) for d in args.runs], Path(args.out) if args.out else None)}")
    return 0


def _serve(args) -> int:
    from .serve import serve

    import threading

    try:
        server = serve(args.model, args.host, args.port)
    except OSError as e:
        raise AltlmError(
            f"serve: cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port"
        ) from None
    host, port = server.server_address[:2]
    print(f"serving {args.model} at http://{host}:{port}/v1 (OpenAI chat completions); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


def _recipes(args) -> int:
    from .config import RECIPES_DIR, read_yaml

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        desc = read_yaml(path).get("description", "")
        print(f"{path.stem:24s} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .feedback import SCORERS  # light: the scorers themselves load on use

    p = argparse.ArgumentParser(prog="altlm", description="Align language models with textual feedback (ALT).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run all ALT iterations of a recipe")
    t.add_argument("--config", help="recipe file or shipped recipe name (default: sentiment-demo)")
    t.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR where it stopped (killed or interrupted, mid-phase included); with --config: the same command again, which starts the run if DIR holds none yet",
    )
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    t.add_argument("--help-config", action="store_true", help="list every config key with its help")
    t.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. output_dir=runs/x iterations=2"
    )
    t.set_defaults(fn=_train)
    g = sub.add_parser(
        "generate", help="sample from a trained run (under its exemplar feedback by default) or a plain model"
    )
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
    e = sub.add_parser(
        "eval", help="evaluate a run (reference vs final, under its feedback) or a plain model; writes eval.json"
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: evaluates its base model untagged and its checkpoint under feedback")
    src.add_argument("--model", help="model id, alias or folder, evaluated without feedback")
    e.add_argument(
        "--prompts", help="prompt file (.txt one per line, .jsonl with 'prompt'); default: the run's held-out prompts"
    )
    e.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    e.add_argument(
        "--feedback",
        nargs="+",
        metavar="TEXT",
        help="feedback strings, each at --samples-per-prompt "
        "(default: the exemplar at --samples-per-prompt, every other feedback string at --steer-samples-per-prompt)",
    )
    e.add_argument("--samples-per-prompt", type=int, default=25, help="k for avg max / probability (paper: 25)")
    e.add_argument(
        "--steer-samples-per-prompt",
        type=int,
        default=4,
        help="samples per prompt for the non-exemplar feedback strings (steerability; 0 skips them)",
    )
    e.add_argument("--perplexity-model", default="gemma3-270m", help="scoring LM for fluency, or 'none'")
    e.add_argument(
        "--perplexity-samples-per-prompt",
        type=int,
        default=3,
        help="perplexity is averaged over each prompt's first N samples (the scoring LM costs more than sampling)",
    )
    e.add_argument("--scorer", choices=SCORERS, help="default: the run's scorer (jigsaw for --model)")
    e.add_argument("--no-reference", action="store_true", help="skip the reference model")
    e.add_argument("--seed", type=int, default=7)
    e.add_argument("--out", help="output file (default: <run>/eval.json, or ./eval.json for --model)")
    e.set_defaults(fn=_eval)
    rp = sub.add_parser("report", help="write report.md with plots for one or more run folders")
    rp.add_argument("runs", nargs="+", metavar="DIR")
    rp.add_argument("--out", help="output folder (default: the run folder; ./altlm-report for several runs)")
    rp.set_defaults(fn=_report)
    sv = sub.add_parser(
        "serve", help="serve a local model as an OpenAI-compatible chat-completions endpoint (an offline judge)"
    )
    sv.add_argument("--model", default="smollm2-135m", help="model id, alias or folder")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000, help="0 = any free port")
    sv.set_defaults(fn=_serve)
    r = sub.add_parser("recipes", help="list shipped recipes")
    r.set_defaults(fn=_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep the terminal for our progress and tables
    # transformers' "Loading weights" bars follow the hub's switch: loading takes seconds, logs should stay readable
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AltlmError as e:
        print(f"altlm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
