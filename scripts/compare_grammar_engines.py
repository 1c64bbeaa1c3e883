"""Measure the two grammar engines on this CPU with the default model's vocabulary:
grammar compile time and per-token mask time (compute the mask, accept the token) while
walking a valid JSON document for a schema, token by token.

    pip install --no-deps --target /tmp/xgr xgrammar apache-tvm-ffi   # xgrammar's own deps
    PYTHONPATH=/tmp/xgr python scripts/compare_grammar_engines.py   # pull triton (~GBs); not needed here

Both engines run in the same process, alternating over the repeats; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "geo": {"type": "array", "items": {"type": "number", "minimum": -180, "maximum": 180},
                    "minItems": 2, "maxItems": 2}},
            "required": ["city", "zip", "geo"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "email", "tags", "address", "score"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@engines.org", "tags": ["red", "blue"],
       "address": {"city": "London", "zip": "12345", "geo": [51.5, -0.12]}, "score": 0.97}


def llguidance_engine(tokenizer):
    import llguidance
    import numpy as np
    import llguidance.numpy as lnp
    lltok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                   eos_token=sorted(tokenizer.eos_token_ids))

    def compile_():
        g = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = llguidance.LLMatcher(lltok, g)
        assert not m.is_error(), m.get_error()
        return m

    def walk(matcher, tokens):
        mask = lnp.allocate_token_bitmask(1, tokenizer.vocab_size)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            lnp.fill_next_token_bitmask(matcher, mask, 0)
            ok = (mask[0, t // 32] >> (t % 32)) & 1
            assert ok and matcher.consume_token(t), "token refused"
            times.append(time.perf_counter() - t0)
        assert matcher.is_accepting()
        return times
    return compile_, walk, llguidance.__version__


def xgrammar_engine(tokenizer):
    import xgrammar as xgr
    from importlib.metadata import version
    vocab = [tokenizer.backend.id_to_token(i) for i in range(tokenizer.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=tokenizer.vocab_size,
                             stop_token_ids=sorted(tokenizer.eos_token_ids))

    def compile_():
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                  separators=(", ", ": ")))

    def walk(matcher, tokens):
        mask = xgr.allocate_token_bitmask(1, tokenizer.vocab_size)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            ok = (int(mask[0, t // 32]) >> (t % 32)) & 1
            assert ok and matcher.accept_token(t), "token refused"
            times.append(time.perf_counter() - t0)
        assert matcher.is_terminated() or matcher.accept_token(sorted(tokenizer.eos_token_ids)[0])
        return times
    return compile_, walk, version("xgrammar")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/grammar_engines.json")
    args = ap.parse_args()
    from miaotui.loader import default_model_path, load_tokenizer, open_checkpoint
    tokenizer = load_tokenizer(open_checkpoint(default_model_path()), None)
    text = json.dumps(DOC)   # separators ", " and ": ", as both grammars are set
    tokens = tokenizer.encode(text, add_special_tokens=False)
    engines = {}
    for name, make in (("llguidance", llguidance_engine), ("xgrammar", xgrammar_engine)):
        t0 = time.perf_counter()
        compile_, walk, ver = make(tokenizer)
        engines[name] = {"setup": (compile_, walk), "version": ver,
                         "tokenizer_setup_s": time.perf_counter() - t0, "compile_s": [], "mask_us": []}
    for _ in range(args.repeats):
        for name, e in engines.items():          # alternate the engines
            compile_, walk = e["setup"]
            t0 = time.perf_counter()
            matcher = compile_()
            e["compile_s"].append(time.perf_counter() - t0)
            e["mask_us"].append(statistics.median(walk(matcher, tokens)) * 1e6)
    result = {"machine": platform.processor() or platform.machine(), "shared_machine": True,
              "vocab_size": tokenizer.vocab_size, "doc_tokens": len(tokens), "repeats": args.repeats,
              "engines": {n: {"version": e["version"], "tokenizer_setup_s": round(e["tokenizer_setup_s"], 3),
                              "compile_ms_median": round(statistics.median(e["compile_s"]) * 1e3, 2),
                              "mask_and_accept_us_per_token_median": round(statistics.median(e["mask_us"]), 1),
                              "compile_ms": [round(x * 1e3, 2) for x in e["compile_s"]],
                              "mask_us": [round(x, 1) for x in e["mask_us"]]}
                          for n, e in engines.items()}}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
