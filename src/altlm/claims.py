"""What a run shows, claim by claim, each with its estimate and a bootstrap interval over held-out prompts.

The evaluation samples every condition (the reference and the final model, untagged and under each feedback
string) on the same held-out prompts, so one resample of the prompts applies to every condition at once (a paired
bootstrap): differences between conditions keep their correlation through the shared prompts.

Scores are turned "good side up" (sign +1 where higher is better, −1 for toxicity), so every claim reads "> 0 is
what the method promises". The reference under the same feedback string is the control for priming: feedback words
move even an untrained model, so a steering claim is the trained model's effect *beyond* the reference's.
"""

from __future__ import annotations

import math

import numpy as np

from .metrics import PPL_CAP, spearman

N_BOOT = 2000


def _by_prompt(records: list[dict], field: str = "score") -> dict[str, list[float]]:
    """Each prompt's values (NaN / missing left out), in the order the prompts first appear."""
    out: dict[str, list[float]] = {}
    for r in records:
        v = r.get("perplexity" if field == "log_perplexity" else field)
        values = out.setdefault(r["prompt"], [])
        if v is None or v != v or (field == "perplexity" and v >= PPL_CAP):
            continue
        if field == "log_perplexity":  # every finite perplexity, in log space (a geometric mean)
            if 0 < v < math.inf:
                values.append(math.log(v))
        else:
            values.append(float(v))
    return out


def _dist2(completions: list[str]) -> float:
    grams = [tuple(w[i : i + 2]) for w in (c.split() for c in completions) for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def _interval(boot: np.ndarray, level: float) -> list[float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))]


def _rank_rows(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (ties broken by position: bootstrap means of continuous scores rarely tie)."""
    return x.argsort(-1).argsort(-1).astype(float)


def _spearman_rows(values: np.ndarray) -> np.ndarray:
    """Spearman of each row of `values` [B, W] (columns: feedback best first) against −rank: +1 = perfect order."""
    w = values.shape[-1]
    follow = -np.arange(w, dtype=float)
    rv = _rank_rows(values)
    rf = follow - follow.mean()
    rv = rv - rv.mean(-1, keepdims=True)
    denom = np.sqrt((rv**2).sum(-1) * (rf**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rv * rf).sum(-1) / denom
    return np.where(values.max(-1) > values.min(-1), rho, np.nan)  # all equal: no order, undefined


def run_claims(
    records: list[dict], words: list[str], exemplar: str, higher_is_better: bool, seed: int = 0, n_boot: int = N_BOOT
) -> dict:
    """The claims of a run from its evaluation samples (eval_samples.jsonl rows): iteration 0 is the reference,
    the last iteration the final model. `words`: the feedback strings, best first (the exemplar among them)."""
    last = max(r["iteration"] for r in records)
    sign = 1.0 if higher_is_better else -1.0
    conditions: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["iteration"] in (0, last):
            model = "reference" if r["iteration"] == 0 else "final"
            conditions.setdefault((model, r["feedback"] or "<none>"), []).append(r)
    prompts = list(_by_prompt(conditions[("reference", "<none>")]))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(prompts), size=(n_boot, len(prompts)))

    def per_prompt(key, field="score", fn=None) -> np.ndarray:
        """[prompts] of a condition: the mean of each prompt's values (fn: a value from its completions)."""
        rows = conditions.get(key, [])
        if fn is not None:
            groups: dict[str, list[str]] = {}
            for r in rows:
                groups.setdefault(r["prompt"], []).append(r["completion"])
            return np.array([fn(groups.get(p, [])) for p in prompts])
        values = _by_prompt(rows, field)
        return np.array([np.mean(values[p]) if values.get(p) else np.nan for p in prompts])

    def estimate_and_boot(x: np.ndarray) -> tuple[float, np.ndarray]:
        """The mean over prompts (NaN prompts left out) and its bootstrap replicates [n_boot]."""
        valid = np.isfinite(x)
        total = np.where(valid, x, 0.0)[picks].sum(1)
        count = valid[picks].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.nanmean(x)) if valid.any() else float("nan"), total / count

    good = {}  # condition → (estimate, replicates) of the good-side-up mean score
    means = {"reference": {}, "final": {}}
    for model, fb in conditions:
        est, boot = estimate_and_boot(per_prompt((model, fb)))
        means[model][fb] = {"mean": est, "interval_95": _interval(boot, 0.95)}  # the score as the scorer gives it
        good[(model, fb)] = (sign * est, sign * boot)

    claims = []

    def claim(name: str, target: str, est: float, boot: np.ndarray, level: float, holds: bool | None) -> None:
        lo, hi = _interval(boot, level)
        claims.append(
            {"claim": name, "target": target, "estimate": est, "interval": [lo, hi], "level": level, "holds": holds}
        )

    best, worst = words[0], words[-1]
    have = [w for w in words if ("final", w) in good]
    if len(have) >= 2:
        est_values = np.array([[good[("final", w)][0] for w in have]])
        boot_values = np.stack([good[("final", w)][1] for w in have], -1)
        rho = round(spearman(list(est_values[0]), [-float(i) for i in range(len(have))]), 10)  # ties: average ranks
        claim("Spearman(feedback rank, score), final", ">= 0.9", rho, _spearman_rows(boot_values), 0.95, rho >= 0.9)
    gaps = {}
    for model in ("final", "reference"):
        if (model, best) in good and (model, worst) in good:
            gaps[model] = (
                good[(model, best)][0] - good[(model, worst)][0],
                good[(model, best)][1] - good[(model, worst)][1],
            )
    if "final" in gaps:
        est, boot = gaps["final"]
        lo = _interval(boot, 0.99)[0]
        claim(f"best - worst feedback ({best} - {worst}), final", "99% interval > 0", est, boot, 0.99, lo > 0)
    if ("final", exemplar) in good:
        fe, fb = good[("final", exemplar)]
        re, rb = good[("reference", "<none>")]
        claim(
            "final under the exemplar - untagged reference",
            "95% interval > 0",
            fe - re,
            fb - rb,
            0.95,
            _interval(fb - rb, 0.95)[0] > 0,
        )
    if "final" in gaps and "reference" in gaps:
        est = gaps["final"][0] - gaps["reference"][0]
        boot = gaps["final"][1] - gaps["reference"][1]
        claim(
            "beyond priming: final gap - reference gap (same feedback)",
            "95% interval > 0",
            est,
            boot,
            0.95,
            _interval(boot, 0.95)[0] > 0,
        )
    if ("final", exemplar) in good and ("reference", exemplar) in good:
        fe, fb = good[("final", exemplar)]
        re, rb = good[("reference", exemplar)]
        claim(
            "beyond priming: final - reference, both under the exemplar",
            "95% interval > 0",
            fe - re,
            fb - rb,
            0.95,
            _interval(fb - rb, 0.95)[0] > 0,
        )
    if ("final", exemplar) in conditions:
        # Geometric means (metrics.perplexity_geomean): the capped arithmetic mean swings with single degenerate
        # completions, enough to flip this claim between two evaluations of one model.
        fe, fb = estimate_and_boot(per_prompt(("final", exemplar), "log_perplexity"))
        re, rb = estimate_and_boot(per_prompt(("reference", "<none>"), "log_perplexity"))
        if math.isfinite(fe) and math.isfinite(re):
            ratio = math.exp(fe - re)
            claim(
                "perplexity ratio (geometric means): final (exemplar) / untagged reference",
                "<= 1.5",
                ratio,
                np.exp(fb - rb),
                0.95,
                ratio <= 1.5,
            )
        fe, fb = estimate_and_boot(per_prompt(("final", exemplar), fn=_dist2))
        re, rb = estimate_and_boot(per_prompt(("reference", "<none>"), fn=_dist2))
        claim(
            "dist-2: final (exemplar) - untagged reference",
            "within ±0.02",
            fe - re,
            fb - rb,
            0.95,
            abs(fe - re) <= 0.02,
        )
    return {
        "prompts": len(prompts),
        "bootstrap": n_boot,
        "sign": "good side up (higher is better)" if sign > 0 else "good side up (the score negated: lower is better)",
        "means": means,
        "claims": claims,
    }
