#!/usr/bin/env python3
"""PPO benchmark (issue 10): PPO against REINFORCE with a baseline, both in the same engine
(``worker.engine.ppo.train_ppo`` with ``ppo.algorithm`` ``ppo`` or ``reinforce``: the same
rollouts, rewards, per-token KL penalty, value head and optimizer; REINFORCE takes one
gradient step per rollout batch on ``-(G_t - V_t) log pi``), on two tasks:

- ``char_fraction``: the reference is a character LM whose next-token distribution is exactly
  uniform over its V = 27 characters (a-z and space; built from a language model trained on
  independent uniform characters, whose decoder is then set to zero, so the reference is
  uniform by construction, not approximately), responses of T = 16 tokens from the empty
  prompt, reward = the fraction of response tokens equal to ``e``, a fixed KL coefficient
  beta. The KL-regularised optimum is known in closed form (issue 10): the policy puts
  ``p* = e^(1/(T beta)) / (e^(1/(T beta)) + V - 1)`` on ``e`` at every position, with
  expected reward ``p*`` and KL per response
  ``T (p* ln(V p*) + (1 - p*) ln(V (1 - p*) / (V - 1)))`` nats. Each run reports how close
  it gets (mean of its last ``--tail`` evaluations).
- ``keywords``: a character LM trained here on tinyshakespeare (``data/tinyshakespeare``,
  or ``core.corpora.find_corpus``), prompts from windows of that text (``from_corpus``),
  reward = the fraction of the response's characters covered by whole-word matches of
  ``--keywords``, adaptive KL control (Ziegler et al. 2019: ``target_kl``, ``kl_horizon``).
  Reported: reward and exact KL per 1,000 rollouts, and the perplexity of the samples under
  the reference (``val_ref_ppl``: how readable the reference finds them), with samples.

Per run: ``val_reward_mean``, ``val_kl`` and ``val_kl_exact`` of the evaluation after every
1,000 rollouts (``rollout_batch_size`` 50, ``eval_interval`` 20: a separate batch of 50
responses from the updated policy), and the throughput in rollout tokens per second
(``PPOResult.rollout_tokens_per_s``: sampled tokens per second of training time, rollouts,
rewards and optimisation, evaluation and checkpoints excluded). Everything runs on the CPU in
this process with ``--threads`` threads; the machine's load average is recorded before and
after (the numbers are only comparable between runs of one invocation).

    nice .venv/bin/python bench/ppo.py --threads 2 --json bench/results/ppo.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

V_CHARS = string.ascii_lowercase + " "  # the 27 characters of the char_fraction task
BATCH = 50  # rollout_batch_size
EVAL_EVERY = 20  # iterations: one evaluation per 1,000 rollouts


def closed_form(V: int, T: int, beta: float) -> dict[str, float]:
    """The KL-regularised optimum of the char_fraction task (module docstring): the reward
    (= p*) and the KL per response (nats)."""
    if beta == 0:
        return {"reward": 1.0, "kl": T * math.log(V)}
    a = math.exp(1.0 / (T * beta))
    p = a / (a + V - 1)
    kl = T * (p * math.log(V * p) + (1 - p) * math.log(V * (1 - p) / (V - 1)))
    return {"reward": p, "kl": kl}


class Hooks:
    """Keeps the metric rows, the samples and the newest checkpoint of each kind."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.samples: dict[int, list[dict[str, Any]]] = {}
        self.checkpoints: dict[str, bytes] = {}

    def on_metrics(self, rows: Sequence[Any]) -> None:
        self.rows.extend(r.as_dict() for r in rows)

    def on_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoints[str(checkpoint.kind.value)] = checkpoint.data

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.samples[step] = samples

    def should_stop(self) -> bool:
        return False


def train_lm(text: str, *, steps: int, embed: int, hidden: int, seq_len: int, lr: float,
             threads: int, seed: int = 0) -> bytes:
    """A character LM trained on ``text`` by the engine; its ``best`` checkpoint's bytes."""
    from core.contract import CorpusTexts
    from core.spec import JobSpec
    from worker.engine.trainer import train

    spec = JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"},  # replaced by the texts below
        "tokenizer": {"kind": "char"},
        "model": {"embed_dim": embed, "hidden_dim": hidden, "num_layers": 1},
        "optimizer": {"lr": lr},
        "training": {"batch_size": 32, "seq_len": seq_len, "max_steps": steps,
                     "eval_interval": steps, "eval_tokens": 20_000, "device": "cpu",
                     "num_threads": threads, "seed": seed, "checkpoint_interval": None,
                     "checkpoint_every_s": None},
    })
    hooks = Hooks()
    train(spec, CorpusTexts(train=text), hooks)
    return hooks.checkpoints["best"]


def uniform_reference(threads: int) -> bytes:
    """A character LM over exactly the 27 characters of :data:`V_CHARS` (no line end in the
    text), trained briefly on independent uniform characters, then with its decoder's weight
    and bias set to zero: every next-token distribution is exactly uniform over the 27
    characters once ``<unk>`` is masked, as the PPO engine samples."""
    import torch

    from worker.engine.checkpoint import (
        build_model_from_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )

    r = random.Random(0)
    text = "".join(r.choice(V_CHARS) for _ in range(60_000))
    data = train_lm(text, steps=20, embed=16, hidden=32, seq_len=32, lr=1e-3, threads=threads)
    ckpt = load_checkpoint(data)
    model = build_model_from_checkpoint(ckpt)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    assert ckpt.tokenizer.vocab_size == len(V_CHARS) + 1, ckpt.tokenizer.vocab_size  # + <unk>
    return save_checkpoint("best", ckpt.spec, model, ckpt.tokenizer, {})


def ppo_spec(init_job: str, ppo: dict[str, Any], *, iterations: int, lr: float,
             min_lr: float | None, threads: int, seed: int) -> Any:
    """``min_lr``: a cosine decay of the learning rate to it over the run (None: constant)."""
    from core.spec import JobSpec

    schedule = ({"kind": "constant"} if min_lr is None
                else {"kind": "cosine", "min_lr": min_lr})
    return JobSpec.model_validate({
        "task": "ppo", "init_from": {"job_id": init_job},
        "ppo": {"rollout_batch_size": BATCH, "lr": lr, **ppo},
        "schedule": schedule,
        "training": {"max_steps": iterations, "eval_interval": EVAL_EVERY, "log_interval": 10,
                     "device": "cpu", "num_threads": threads, "seed": seed,
                     "checkpoint_interval": None, "checkpoint_every_s": None},
    })


def run_one(init: bytes, init_job: str, ppo: dict[str, Any], *, rollouts: int, lr: float,
            threads: int, seed: int, text: str | None = None,
            min_lr: float | None = None) -> tuple[dict[str, Any], bytes]:
    """One fine-tuning run: the per-1,000-rollout evaluations, throughput and samples, and
    the final (``last``) checkpoint."""
    from worker.engine.ppo import build_prompts, load_policy, train_ppo
    from worker.engine.rewards import build_reward

    spec = ppo_spec(init_job, ppo, iterations=rollouts // BATCH, lr=lr, min_lr=min_lr,
                    threads=threads, seed=seed)
    assert spec.ppo is not None
    policy = load_policy(init)
    reward = build_reward(spec.ppo.reward, policy.tokenizer)
    prompts = build_prompts(spec.ppo.prompts, policy.tokenizer, text)
    hooks = Hooks()
    t0 = time.perf_counter()
    result = train_ppo(spec, policy, reward, prompts, hooks)
    wall = time.perf_counter() - t0
    evals = [{"rollouts": r["rollouts_seen"], "reward": r["val_reward_mean"],
              "kl": r["val_kl"], "kl_exact": r["val_kl_exact"], "ref_ppl": r["val_ref_ppl"],
              "kl_coef": r["kl_coef"]}
             for r in hooks.rows if r.get("val_reward_mean") is not None]
    first = hooks.rows[0]
    last_step = max(hooks.samples)
    return {
        "algorithm": spec.ppo.algorithm,
        "ppo": spec.ppo.model_dump(mode="json", exclude={"reward", "prompts"}),
        "initial_reward": result.initial_reward_mean,
        "first_iteration": {"reward": first["reward_mean"], "kl": first["kl"]},
        "evaluations": evals,
        "rollout_tokens_per_s": result.rollout_tokens_per_s,
        "wall_s": wall,
        "final_kl_coef": result.kl_coef,
        "samples": [{"prompt": s["prompt"], "response": s["response"],
                     "reward": s["reward"]} for s in hooks.samples[last_step][:4]],
    }, hooks.checkpoints["last"]


def measure(init: bytes, last: bytes, target: str, T: int, n: int = 2048,
            seed: int = 123) -> dict[str, float]:
    """The final policy's expected char_fraction reward (the mean over positions of
    pi(target | s) from its full distributions, along ``n`` responses it samples from the
    empty prompt) and its exact KL to the reference per response (nats): the quantities the
    closed form gives, without the sampling noise of the rewards."""
    import torch

    from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from worker.engine.generate import start_ids
    from worker.engine.ppo import response_forward, sample_responses

    ref_ckpt, pol_ckpt = load_checkpoint(init), load_checkpoint(last)
    ref = build_model_from_checkpoint(ref_ckpt).eval()
    pol = build_model_from_checkpoint(pol_ckpt).eval()
    tok = ref_ckpt.tokenizer
    prompts = [start_ids(tok, "")] * n
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        resp = sample_responses(pol, prompts, T, 1.0, tok.unk_id, gen, torch.device("cpu"))
        lp, _ = response_forward(pol, None, prompts, resp, 1.0, tok.unk_id)
        lq, _ = response_forward(ref, None, prompts, resp, 1.0, tok.unk_id)
    p = lp.exp()
    reward = float(p[:, :, tok.encode(target)[0]].mean())
    kl = float(torch.where(p > 0, p * (lp - lq), 0.0).sum(dim=(1, 2)).mean())
    return {"reward": reward, "kl": kl}


def extra(a: argparse.Namespace) -> dict[str, Any]:
    """``--set FIELD=VALUE`` as ppo section fields."""
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}


def char_variants(beta: float) -> list[tuple[str, dict[str, Any]]]:
    """(name, ppo fields) of the runs at ``beta``: PPO with Monte-Carlo advantages (lam = 1),
    REINFORCE with the value head as baseline, and at the first beta also PPO with the
    default lam = 0.95 (GAE), whose fixed point this task biases (docs/ppo.md)."""
    out: list[tuple[str, dict[str, Any]]] = [("ppo", {"algorithm": "ppo", "lam": 1.0}),
                                             ("reinforce", {"algorithm": "reinforce"})]
    if beta == 0.05:
        out.append(("ppo_lam_0.95", {"algorithm": "ppo", "lam": 0.95}))
    return out


def run_char_fraction(a: argparse.Namespace) -> dict[str, Any]:
    init = uniform_reference(a.threads)
    T, V = 16, len(V_CHARS)
    out: dict[str, Any] = {"V": V, "T": T, "rollouts": a.char_rollouts, "lr": a.char_lr,
                           "min_lr": a.char_lr * 0.1, "runs": []}
    for beta in a.betas:
        optimum = closed_form(V, T, beta)
        for (name, fields), seed in ((v, seed) for v in char_variants(beta)
                                     for seed in a.seeds):
            if fields["algorithm"] not in a.algorithms:
                continue
            ppo = {"reward": {"kind": "char_fraction", "target": "e"}, "response_length": T,
                   "kl_coef": beta, **fields, **extra(a)}
            t0 = time.perf_counter()
            run, last = run_one(init, "job_uniform", ppo, rollouts=a.char_rollouts,
                                lr=a.char_lr, min_lr=a.char_lr * 0.1, threads=a.threads,
                                seed=seed)
            final = measure(init, last, "e", T)
            run.update(name=name, beta=beta, seed=seed, optimum=optimum, final=final,
                       reward_gap=final["reward"] - optimum["reward"],
                       kl_rel_gap=(final["kl"] - optimum["kl"]) / optimum["kl"])
            out["runs"].append(run)
            print(f"char_fraction beta={beta} {name} seed {seed}: reward "
                  f"{final['reward']:.3f} (optimum {optimum['reward']:.3f}), KL "
                  f"{final['kl']:.2f} (optimum {optimum['kl']:.2f}), "
                  f"{run['rollout_tokens_per_s']:.0f} tok/s, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    return out


def shakespeare() -> str:
    from core.corpora import find_corpus

    path = find_corpus("tinyshakespeare/input.txt")
    if path is None:
        raise SystemExit("tinyshakespeare not found (data/tinyshakespeare/input.txt)")
    return path.read_text(encoding="utf-8")


def own_sample_ppl(init: bytes, text: str, n: int = 256, T: int = 32) -> float:
    """The reference's perplexity on its own samples (temperature 1, prompts of 16 tokens from
    ``text``): what ``val_ref_ppl`` is for text as readable as the reference's."""
    import torch

    from core.spec import PromptsFromCorpus, PromptsSpec
    from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from worker.engine.ppo import build_prompts, response_forward, sample_responses

    ckpt = load_checkpoint(init)
    ref = build_model_from_checkpoint(ckpt).eval()
    sampler = build_prompts(PromptsSpec(from_corpus=PromptsFromCorpus(prompt_tokens=16)),
                            ckpt.tokenizer, text)
    prompts = sampler.sample(n, random.Random(7))
    with torch.no_grad():
        resp = sample_responses(ref, prompts, T, 1.0, ckpt.tokenizer.unk_id,
                                torch.Generator().manual_seed(7), torch.device("cpu"))
        lq, _ = response_forward(ref, None, prompts, resp, 1.0, None)
    return math.exp(float(-lq.gather(2, resp[:, :, None]).mean()))


def run_keywords(a: argparse.Namespace) -> dict[str, Any]:
    text = shakespeare()[:200_000]
    t0 = time.perf_counter()
    init = train_lm(text, steps=a.lm_steps, embed=32, hidden=a.lm_hidden, seq_len=64,
                    lr=5e-3, threads=a.threads)
    lm_s = time.perf_counter() - t0
    ref_ppl = own_sample_ppl(init, text)
    print(f"tinyshakespeare LM: {a.lm_steps} steps in {lm_s:.0f} s; perplexity of its own "
          f"samples {ref_ppl:.2f}", flush=True)
    out: dict[str, Any] = {"keywords": a.keywords, "rollouts": a.kw_rollouts, "lr": a.kw_lr,
                           "lm": {"steps": a.lm_steps, "embed_dim": 32,
                                  "hidden_dim": a.lm_hidden, "train_s": lm_s,
                                  "text_chars": len(text), "own_sample_ppl": ref_ppl},
                           "target_kl": a.target_kl, "kl_horizon": a.kl_horizon, "runs": []}
    for algorithm, seed in ((x, seed) for x in a.algorithms for seed in a.seeds):
        ppo = {"reward": {"kind": "keywords", "words": a.keywords},
               "prompts": {"from_corpus": {"prompt_tokens": 16}}, "response_length": 32,
               "num_minibatches": 2, "kl_coef": a.kw_kl_coef, "target_kl": a.target_kl,
               "kl_horizon": a.kl_horizon, "algorithm": algorithm, **extra(a)}
        t1 = time.perf_counter()
        run, _ = run_one(init, "job_shakespeare", ppo, rollouts=a.kw_rollouts, lr=a.kw_lr,
                         threads=a.threads, seed=seed, text=text)
        run["seed"] = seed
        out["runs"].append(run)
        e = run["evaluations"]
        print(f"keywords {algorithm} seed {seed}: reward {run['initial_reward']:.3f} -> "
              f"{e[-1]['reward']:.3f}, KL exact {e[-1]['kl_exact']:.2f} "
              f"(target {a.target_kl}), samples' ppl under the reference {e[-1]['ref_ppl']:.2f}, "
              f"{run['rollout_tokens_per_s']:.0f} tok/s, {time.perf_counter() - t1:.0f} s",
              flush=True)
    return out


def _mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs),
            "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (beta, variant) over the seeds: the mean and sample standard deviation of the
    evaluation reward and exact KL after each 1,000 rollouts, of the final exact reward and KL
    (char_fraction) and of the throughput."""
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r.get("beta"), r.get("name", r["algorithm"])), []).append(r)
    out = []
    for (beta, name), rs in groups.items():
        n = min(len(r["evaluations"]) for r in rs)
        row: dict[str, Any] = {
            "beta": beta, "name": name, "seeds": [r["seed"] for r in rs],
            "per_1000_rollouts": [
                {"rollouts": rs[0]["evaluations"][i]["rollouts"],
                 "reward": _mean_sd([r["evaluations"][i]["reward"] for r in rs]),
                 "kl_exact": _mean_sd([r["evaluations"][i]["kl_exact"] for r in rs]),
                 "ref_ppl": _mean_sd([r["evaluations"][i]["ref_ppl"] for r in rs])}
                for i in range(n)],
            "rollout_tokens_per_s": _mean_sd([r["rollout_tokens_per_s"] for r in rs]),
        }
        if "final" in rs[0]:
            row["final_reward"] = _mean_sd([r["final"]["reward"] for r in rs])
            row["final_kl"] = _mean_sd([r["final"]["kl"] for r in rs])
            row["optimum"] = rs[0]["optimum"]
        out.append(row)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="char_fraction,keywords")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training.seed of the fine-tuning runs (the LMs use seed 0)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.02])
    p.add_argument("--char-rollouts", type=int, default=10_000)
    p.add_argument("--char-lr", type=float, default=0.03,
                   help="cosine-decayed to a tenth over the run")
    p.add_argument("--lm-steps", type=int, default=500)
    p.add_argument("--lm-hidden", type=int, default=128)
    p.add_argument("--keywords", nargs="+", default=["the", "and", "my", "you", "love"])
    p.add_argument("--kw-rollouts", type=int, default=5000)
    p.add_argument("--kw-lr", type=float, default=1e-3)
    p.add_argument("--kw-kl-coef", type=float, default=0.1)
    p.add_argument("--target-kl", type=float, default=6.0)
    p.add_argument("--kl-horizon", type=int, default=200)
    p.add_argument("--algorithms", nargs="+", default=["ppo", "reinforce"])
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="extra ppo section fields for every run (JSON values), e.g. lam=1.0")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"char_fraction", "keywords"}
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}: choose char_fraction, keywords")
    import torch

    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "command": "bench/ppo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "threads": a.threads, "load_average_before": list(os.getloadavg())},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    threads_before = torch.get_num_threads()
    try:
        if "char_fraction" in tasks:
            out["char_fraction"] = run_char_fraction(a)
        if "keywords" in tasks:
            out["keywords"] = run_keywords(a)
    finally:
        torch.set_num_threads(threads_before)
    for task in ("char_fraction", "keywords"):
        if task in out:
            out[task]["summary"] = summarise(out[task]["runs"])
    out["machine"]["load_average_after"] = list(os.getloadavg())
    out["elapsed_s"] = time.perf_counter() - t0
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
