"""The three example applications (examples/), each run as a user would, on the default
model and a small input; plus their retrieval, sentence-splitting and scoring pieces."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

pytest.importorskip("rank_bm25")
pytest.importorskip("pysbd")


def run(script: str, *args: str, stdin: str | None = None, check: bool = True):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], input=stdin,
                       capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


# ---- customer service ---------------------------------------------------------------------
def test_faq_retrieval_finds_the_passage():
    from customer_service import DEFAULT_FAQ, FAQ
    faq = FAQ(open(DEFAULT_FAQ, encoding="utf-8").read())
    assert len(faq.passages) == 15
    cases = {"How do I reset my thermostat to factory settings?": "How do I reset",
             "Does it work with electric baseboard heaters?": "Which heating systems",
             "how long is the warranty": "What is the warranty",
             "My screen is blank": "The screen is blank",
             "Can I send it back for a refund?": "How do I return"}
    for question, title in cases.items():
        assert faq.search(question, 1)[0].startswith(title), question
    assert len(faq.search("thermostat wifi reset", 3)) == 3
    # nothing matches: the model gets the contact passage
    assert faq.search("bitcoin", 2)[0].startswith("How do I contact customer support?")
    with pytest.raises(ValueError):
        FAQ("no sections here")


def test_customer_service_answers_from_the_faq(smollm2_path, tmp_path):
    out = tmp_path / "cs.json"
    r = run("customer_service.py", "How do I reset the thermostat to factory settings?",
            "How long does express shipping take?", "--max-tokens", "48", "--json", str(out))
    result = json.loads(out.read_text())
    first, second = result["questions"]
    assert first["passages"] == ["How do I reset the thermostat to factory settings?"]
    assert second["passages"] == ["How much does shipping cost and how long does it take?"]
    for q in (first, second):
        assert q["answer"].strip() and q["answer"] in r.stdout     # streamed to stdout
        assert 0 < q["retrieval_s"] < q["ttft_s"] <= q["total_s"]
        assert 0 < q["output_tokens"] <= 48
    assert "10 seconds" in first["answer"]                         # grounded in the passage
    assert result["ttft_s"]["n"] == 2 and "time to first token" in r.stderr


def test_customer_service_bad_input():
    r = run("customer_service.py", "--faq", "/nonexistent.md", "hi", check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: --faq /nonexistent.md")
    r = run("customer_service.py", "--speculative", "medusa", "hi", check=False)
    assert r.returncode == 2 and "unknown speculative method" in r.stderr


# ---- translation ----------------------------------------------------------------------------
def test_sentences_are_cut_as_they_complete():
    from translate import sentences
    lines = ["Mr. Smith arrived at 9 p.m. on Monday. He was", "tired!", "", "", "Where is it?",
             "No final stop"]
    got = [s for s, _ in sentences(lines)]
    assert got == ["Mr. Smith arrived at 9 p.m. on Monday.", "He was tired!", None,
                   "Where is it?", "No final stop"]

    def slow():                     # a sentence is given out before the next line is read
        yield "One sentence. Another"
        assert seen == ["One sentence."]
        yield "one."
    seen = []
    for s, _ in sentences(slow()):
        seen.append(s)
    assert seen == ["One sentence.", "Another one."]


def test_translate_streams_sentence_by_sentence(smollm2_path, tmp_path):
    out = tmp_path / "tr.json"
    text = "I am looking for the museum. Good morning!\n\nThe train leaves at nine.\n"
    r = run("translate.py", "--to", "French", "--max-tokens", "24", "--json", str(out), stdin=text)
    result = json.loads(out.read_text())
    assert [s["sentence"] for s in result["sentences"]] == \
        ["I am looking for the museum.", "Good morning!", "The train leaves at nine."]
    for s in result["sentences"]:
        assert s["translation"] and "\n" not in s["translation"]
        assert 0 < s["first_token_s"] <= s["latency_s"] and s["translate_s"] <= s["latency_s"]
    # in order, the paragraph break kept
    t = [s["translation"] for s in result["sentences"]]
    assert r.stdout.index(t[0]) < r.stdout.index(t[1]) < r.stdout.index("\n\n") < r.stdout.index(t[2])
    assert set(result["latency_s"]) == {"mean", "p50", "p90", "n"} and result["latency_s"]["n"] == 3
    assert "p90" in r.stderr


def test_translate_bad_input():
    r = run("translate.py", "/nonexistent.txt", check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: /nonexistent.txt")


# ---- recommendation -------------------------------------------------------------------------
def test_recommend_shares_the_profile(smollm2_path, tmp_path):
    out = tmp_path / "rec.json"
    r = run("recommend.py", "-n", "8", "--profile", "I love clever detectives, locked-room puzzles "
            "and solving the crime before the last chapter, in foggy Victorian London.",
            "--top", "3", "--json", str(out))
    result = json.loads(out.read_text())
    (user,) = result["users"]
    shared, alone = user["shared"], user["unshared"]
    assert user["same_scores"] is True                  # sharing changes no score
    assert shared["cached_prompt_tokens"] >= 8 * 16      # the profile came from the cache ...
    assert alone["cached_prompt_tokens"] == 0            # ... and without sharing it did not
    assert shared["prompt_tokens"] == alone["prompt_tokens"]
    assert len(user["top"]) == 3 and shared["candidates_per_s"] > 0
    assert "Sherlock Holmes" in " ".join(user["top"])   # a detective fan gets detectives
    assert "candidates scored" in r.stderr and "identical" in r.stderr


def test_prefix_sharing_scores_equal_plain_prompt_logprobs(smollm2_path):
    """The example's scores are the prompt log-probs of profile + item, as one plain
    request without the cache computes them."""
    from recommend import PREFIX, Scorer
    from miaotui import LLM, SamplingParams
    llm = LLM(smollm2_path, kv_cache_memory=64 << 20, max_model_len=1024)
    items = ["Dracula: a vampire count travels to England", "Chess for Beginners: the rules"]
    scorer = Scorer(llm, items)
    scores, _ = scorer.score("I like chess.", share=True)
    prefix = llm.tokenizer.encode(PREFIX.format(profile="I like chess."))
    plain = LLM(smollm2_path, kv_cache_memory=64 << 20, max_model_len=1024,
                enable_prefix_caching=False)
    for item, score in zip(items, scores):
        ids = llm.tokenizer.encode(item, add_special_tokens=False)
        out = plain.generate([prefix + ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
        assert score == statistics.fmean(e.logprob for e in out.prompt_logprobs[len(prefix):])
