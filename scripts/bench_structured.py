"""What structured output costs per output token: constrained vs unconstrained decoding on
the default model, at batch 1 and batch 16, in the same run (variants alternating, medians
over the rounds, and the median of each round's constrained/unconstrained ratio).

    python scripts/bench_structured.py --rounds 5 --out results/structured_cost.json

Each run sends `batch` chat requests (distinct prompts) with `--output-len` greedy tokens
each; the unconstrained ones ignore EOS, the constrained ones follow a JSON schema (an
array of at least 50 records: it cannot end before the token budget). Only decode steps
(no prompt tokens in the step) are timed: time per output token = their total time /
the tokens they produced. The grammar is compiled (and cached) before the timed rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org|net)$"},
    "tags": {"type": "array", "items": {"enum": ["new", "vip", "churned", "trial"]}, "maxItems": 3},
    "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}},
    "required": ["name", "age", "email", "tags", "score"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 50}


GRAMMAR_TIME = [0.0]    # seconds spent in the grammar work (masks, matcher advances)


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            GRAMMAR_TIME[0] += time.perf_counter() - t0
    return wrapper


def instrument() -> None:
    """Time the grammar's share of each step directly (less noisy than the difference of
    two runs on a shared machine): the sampler's mask and the engine's matcher advance."""
    from miaotui.engine import structured
    structured.apply_masks = _timed(structured.apply_masks)
    structured.Constraint.advance = _timed(structured.Constraint.advance)


def run(llm, batch: int, output_len: int, constrained: bool, tag: str) -> dict:
    from miaotui.sampling_params import SamplingParams
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=not constrained,
                            structured_output={"json": SCHEMA} if constrained else None)
    for i in range(batch):
        prompt = llm.apply_chat_template([{"role": "user", "content":
                                           f"List customer records (batch {tag}, #{i}) as JSON."}])
        engine.add_request(f"{tag}-{i}", prompt, params)
    decode_time, decode_tokens, outputs = 0.0, 0, {}
    GRAMMAR_TIME[0] = 0.0
    while engine.has_unfinished():
        prefill = any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or bool(engine.scheduler.waiting)
        before = engine.stats["generated_tokens"]
        t0 = time.perf_counter()
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0]
        dt = time.perf_counter() - t0
        if prefill:
            grammar_in_prefill = GRAMMAR_TIME[0]
        else:
            decode_time += dt
            decode_tokens += engine.stats["generated_tokens"] - before
    lengths = [len(o.token_ids) for o in outputs.values()]
    assert lengths == [output_len] * batch, lengths     # both variants decode the whole budget
    if constrained:   # the work was real: every answer is JSON of the schema so far
        assert all(o.text.startswith('[{"name": "') for o in outputs.values()), outputs
    grammar = GRAMMAR_TIME[0] - locals().get("grammar_in_prefill", 0.0)
    return {"ms_per_token": 1e3 * decode_time / decode_tokens, "decode_tokens": decode_tokens,
            "grammar_ms_per_token": 1e3 * grammar / decode_tokens,
            "ms_per_step": 1e3 * decode_time / (decode_tokens / batch)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out", default="results/structured_cost.json")
    args = ap.parse_args()
    from miaotui.llm import LLM
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(max_num_seqs=max(batches))
    instrument()
    t0 = time.perf_counter()
    grammars = llm.engine.grammars            # the llguidance tokenizer, built once per model
    setup_ms = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    grammars.compile(__import__("miaotui").StructuredOutputParams(json=SCHEMA))
    compile_ms = 1e3 * (time.perf_counter() - t0)
    run(llm, 2, 8, True, "warm")
    run(llm, 2, 8, False, "warm")
    samples = {(b, c): [] for b in batches for c in (False, True)}
    for r in range(args.rounds):
        for b in batches:
            for c in ((False, True) if r % 2 == 0 else (True, False)):   # alternate the order too
                res = run(llm, b, args.output_len, c, f"r{r}b{b}{'c' if c else 'u'}")
                samples[(b, c)].append(res)
                print(f"round {r} batch {b:2d} {'constrained  ' if c else 'unconstrained'} "
                      f"{res['ms_per_token']:.3f} ms/token (grammar {res['grammar_ms_per_token']:.3f})",
                      file=sys.stderr)
    result = {"model": "SmolLM2-135M-Instruct Q4_1 (default)", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "shared_machine": True, "rounds": args.rounds,
              "output_len": args.output_len, "schema": SCHEMA, "grammar_compile_ms": round(compile_ms, 2),
              "tokenizer_setup_ms": round(setup_ms, 1),
              "batches": {}}
    for b in batches:
        med = {c: statistics.median(x["ms_per_token"] for x in samples[(b, c)]) for c in (False, True)}
        result["batches"][str(b)] = {
            "unconstrained_ms_per_token": round(med[False], 4), "constrained_ms_per_token": round(med[True], 4),
            "added_time_per_token": round(med[True] / med[False] - 1, 4),
            # each round's two runs are back to back: their ratio cancels slow load drifts
            "added_time_per_token_paired": round(statistics.median(
                c["ms_per_token"] / u["ms_per_token"] for c, u in zip(samples[(b, True)], samples[(b, False)])) - 1, 4),
            # the grammar's own time per output token, timed inside the constrained runs
            "grammar_ms_per_token": round(statistics.median(x["grammar_ms_per_token"] for x in samples[(b, True)]), 4),
            "grammar_share_of_constrained_time": round(statistics.median(
                x["grammar_ms_per_token"] / x["ms_per_token"] for x in samples[(b, True)]), 4),
            "unconstrained_samples": [round(x["ms_per_token"], 4) for x in samples[(b, False)]],
            "constrained_samples": [round(x["ms_per_token"], 4) for x in samples[(b, True)]]}
    print(json.dumps(result["batches"], indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
