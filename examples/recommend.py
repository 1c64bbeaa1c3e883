"""Recommendation by likelihood: rank candidate items for a user by how probable the model
finds each item's text right after the user's profile.

Every candidate is scored in one batch through prompt log-probs (max_tokens=0: nothing is
generated). The profile is the same for all of them, so it is computed once: it goes
first, alone, and the candidates then take its KV blocks from the prefix cache
(SamplingParams(prompt_logprobs_start=len(profile)) asks for log-probs of the candidate's
tokens only, which lets the engine reuse the cached blocks before them). The same batch
without sharing (every candidate recomputing the profile) is timed in the same run, and
both must give the same scores.

An item's score is the mean log-probability of its tokens after the profile minus the same
after a neutral profile (scored once for all users), so that items the model finds likely
everywhere (short, common words) do not win for everybody.

    python examples/recommend.py                           # the 3 sample profiles x 40 books
    python examples/recommend.py --profile "I like cooking and gardening." -n 20

Uses only the public API (miaotui.LLM, SamplingParams). Over HTTP, /v1/completions with
echo=true, logprobs=0, max_tokens=0 returns the same prompt log-probs (see the README).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from common import add_model_args, fail, load_llm, write_json
from miaotui import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "A reader describes their taste: {profile}\nThe book we recommend to this reader:\n"
NEUTRAL = "A reader."


class Scorer:
    def __init__(self, llm, items: list[str]):
        self.llm, self.items = llm, items
        encode = llm.tokenizer.encode
        self.item_ids = [encode(item, add_special_tokens=False) for item in items]
        self.baseline, _ = self.score(NEUTRAL, share=True)

    def score(self, profile: str, share: bool) -> tuple[list[float], dict]:
        """Mean log-prob of each item's tokens after `profile`, and what it cost."""
        prefix = self.llm.tokenizer.encode(PREFIX.format(profile=profile))
        t0 = time.perf_counter()
        if share:   # the profile alone first: its full blocks enter the prefix cache
            self.llm.generate([prefix], SamplingParams(max_tokens=0))
        params = SamplingParams(max_tokens=0, prompt_logprobs=0,
                                prompt_logprobs_start=len(prefix) if share else 0)
        outs = self.llm.generate([prefix + ids for ids in self.item_ids], params)
        seconds = time.perf_counter() - t0
        scores = [statistics.fmean(e.logprob for e in out.prompt_logprobs[len(prefix):]) for out in outs]
        cost = {"seconds": seconds, "candidates_per_s": len(outs) / seconds,
                "profile_tokens": len(prefix),
                "cached_prompt_tokens": sum(out.num_cached_tokens for out in outs),
                "prompt_tokens": sum(len(out.prompt_token_ids) for out in outs)}
        return scores, cost

    def rank(self, profile: str, share: bool = True) -> tuple[list[tuple[float, str]], dict]:
        scores, cost = self.score(profile, share)
        ranked = sorted(zip((s - b for s, b in zip(scores, self.baseline)), self.items), reverse=True)
        return ranked, {**cost, "raw_scores": scores}


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as exc:
        fail(f"{path}: {exc.strerror}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default=os.path.join(HERE, "data", "books.txt"),
                   help="candidate items, one a line")
    p.add_argument("--profiles", default=os.path.join(HERE, "data", "profiles.txt"),
                   help="user profiles, one a line")
    p.add_argument("--profile", action="append", help="a user profile (instead of --profiles)")
    p.add_argument("-n", type=int, default=None, help="score only the first N items")
    p.add_argument("--top", type=int, default=5, help="items shown per user")
    p.add_argument("--no-baseline-run", action="store_true",
                   help="skip timing the batch without prefix sharing")
    add_model_args(p)
    args = p.parse_args(argv)
    items = read_lines(args.items)[:args.n]
    profiles = args.profile or read_lines(args.profiles)
    if not items or not profiles:
        fail("no items or no profiles")
    llm = load_llm(args)
    scorer = Scorer(llm, items)
    users = []
    for profile in profiles:
        ranked, shared = scorer.rank(profile, share=True)
        print(f"\n{profile}")
        for score, item in ranked[:args.top]:
            print(f"  {score:+.3f}  {item}")
        record = {"profile": profile, "top": [item for _, item in ranked[:args.top]],
                  "shared": {k: v for k, v in shared.items() if k != "raw_scores"}}
        line = (f"  [{len(items)} candidates scored at {shared['candidates_per_s']:.1f}/s with the "
                f"profile computed once ({shared['cached_prompt_tokens']} of "
                f"{shared['prompt_tokens']} prompt tokens from the prefix cache)")
        if not args.no_baseline_run:   # after the shared run: this one never reads the cache
            _, alone = scorer.rank(profile, share=False)
            same = alone["raw_scores"] == shared["raw_scores"]
            record["unshared"] = {k: v for k, v in alone.items() if k != "raw_scores"}
            record["same_scores"] = same
            line += (f"; {alone['candidates_per_s']:.1f}/s recomputing it for each "
                     f"({shared['candidates_per_s'] / alone['candidates_per_s']:.2f}x); scores "
                     f"{'identical' if same else 'DIFFER'}")
            if not same:
                print(line + "]", file=sys.stderr)
                fail("the scores with and without prefix sharing differ")
        print(line + "]", file=sys.stderr)
        users.append(record)
    rates = {mode: statistics.median(u[mode]["candidates_per_s"] for u in users)
             for mode in ("shared", "unshared") if mode in users[0]}
    print(f"[median candidates/s: " + ", ".join(f"{m} {r:.1f}" for m, r in rates.items()) + "]",
          file=sys.stderr)
    write_json(args.json, {"example": "recommend", "items": len(items), "median_candidates_per_s": rates,
                           "users": users})


if __name__ == "__main__":
    main()
