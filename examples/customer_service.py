"""A customer-service assistant answering in real time from a product's FAQ.

Each question goes through BM25 retrieval over the FAQ's question-and-answer passages (the
`rank_bm25` package), and the model answers from the best passages only, streamed token by
token. Time to first token (from the question, retrieval included) and total time are
reported per question and summarized.

    python examples/customer_service.py "How do I reset the thermostat?" "Can I return it?"
    echo "Does it work with electric baseboard heaters?" | python examples/customer_service.py
    python examples/customer_service.py --speculative ngram "..."   # prompt-lookup speculation

Uses only the public API (miaotui.LLM, SamplingParams). The default FAQ (data/lumo_faq.md)
is a fictional thermostat's, written for this example.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

from rank_bm25 import BM25Okapi

from common import add_model_args, fail, load_llm, ms, summary, write_json
from miaotui import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FAQ = os.path.join(HERE, "data", "lumo_faq.md")
WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = set("""a an and are as at be by can do does for from how i if in is it my of on or
the this to what when where which who why will with you your me we our there their""".split())
# The instructions come first and never change, so the prefix cache holds them across questions.
SYSTEM = ("You are a friendly customer-service assistant. Answer briefly, using only the facts "
          "in the FAQ passages the customer's message quotes.")
USER = "FAQ passages:\n\n{passages}\n\nMy question: {question}"


def words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if w not in STOPWORDS]


class FAQ:
    """The FAQ's '## question' sections, searchable with BM25 (Okapi)."""

    def __init__(self, text: str):
        sections = re.split(r"^## ", text, flags=re.M)[1:]
        self.passages = [s.strip() for s in sections if s.strip()]
        if not self.passages:
            raise ValueError("the FAQ has no '## question' sections")
        self.index = BM25Okapi([words(p) for p in self.passages])
        # what the model gets when nothing matches: how to reach a person
        self.fallback = [p for p in self.passages if "contact" in p.split("\n", 1)[0].lower()][:1]

    def search(self, question: str, k: int) -> list[str]:
        """The `k` passages that best match `question` (fewer if fewer share a word with
        it; the contact passage if none does)."""
        scores = self.index.get_scores(words(question))
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
        return [self.passages[i] for i in best if scores[i] > 0] or self.fallback


def answer(llm, faq: FAQ, question: str, args, out=sys.stdout) -> dict:
    """Retrieve, then stream the answer to `out`; returns the timings."""
    t0 = time.perf_counter()
    passages = faq.search(question, args.top_k)
    t_retrieved = time.perf_counter()
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER.format(passages="\n\n".join(passages), question=question)}]
    prompt = llm.apply_chat_template(messages)
    # one paragraph, or one list (a small model otherwise goes on and repeats itself): a blank
    # line ends the answer unless the text before it announces steps
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0,
                            stop=["\n\n\n", ".\n\n"])
    first, text, n_tokens = None, "", 0
    for step in llm.stream(prompt, params):
        o = step.outputs[0]
        if o.delta_text:
            if first is None:
                first = time.perf_counter()
            out.write(o.delta_text)
            out.flush()
            text += o.delta_text
        n_tokens = len(o.token_ids)
    end = time.perf_counter()
    out.write("\n")
    decode = (n_tokens - 1) / (end - first) if first and n_tokens > 1 and end > first else None
    return {"question": question, "answer": text, "passages": [p.split("\n", 1)[0] for p in passages],
            "prompt_tokens": len(prompt), "output_tokens": n_tokens,
            "retrieval_s": t_retrieved - t0, "ttft_s": (first or end) - t0, "total_s": end - t0,
            "decode_tok_s": decode}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("questions", nargs="*", help="questions (default: one a line from stdin)")
    p.add_argument("--faq", default=DEFAULT_FAQ, help="a Markdown FAQ with one '## question' per passage")
    p.add_argument("--top-k", type=int, default=1, help="passages given to the model (a 135M "
                   "model answers best from one)")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.0)
    add_model_args(p)
    args = p.parse_args(argv)
    try:
        with open(args.faq, encoding="utf-8") as f:
            faq = FAQ(f.read())
    except (OSError, ValueError) as exc:
        fail(f"--faq {args.faq}: {exc}")
    if args.top_k < 1 or args.max_tokens < 1:
        fail("--top-k and --max-tokens must be at least 1")
    questions = args.questions or [line.strip() for line in sys.stdin if line.strip()]
    if not questions:
        fail("no question given")
    llm = load_llm(args)
    results = []
    for q in questions:
        print(f"> {q}", flush=True)
        r = answer(llm, faq, q, args)
        results.append(r)
        rate = f", {r['decode_tok_s']:.0f} tok/s" if r["decode_tok_s"] else ""
        print(f"[retrieval {r['retrieval_s'] * 1000:.1f} ms ({'; '.join(r['passages'])}), "
              f"TTFT {r['ttft_s'] * 1000:.0f} ms, {r['output_tokens']} tokens in "
              f"{r['total_s']:.2f} s{rate}]", file=sys.stderr, flush=True)
    ttft, total = summary([r["ttft_s"] for r in results]), summary([r["total_s"] for r in results])
    print(f"[{len(results)} questions: time to first token {ms(ttft)}; total {ms(total)}]",
          file=sys.stderr)
    write_json(args.json, {"example": "customer_service", "faq": os.path.relpath(args.faq),
                           "top_k": args.top_k, "max_tokens": args.max_tokens,
                           "speculative": args.speculative, "ttft_s": ttft, "total_s": total,
                           "questions": results})


if __name__ == "__main__":
    main()
