"""Real-time translation: text arrives (a file, or stdin as it is typed or piped), is cut into
sentences as soon as each one is complete (the `pysbd` sentence splitter), and each sentence
is translated at once, its translation streamed token by token. Per-sentence latency (from
the sentence being read complete to its translation done, waiting behind the sentences
before it included), time to its first translated token, and the translation's own time
are reported as mean / p50 / p90.

    python examples/translate.py examples/data/travel_en.txt --to French
    some-speech-recognizer | python examples/translate.py --to Spanish

The prompt is a few-shot conversation that is the same for every sentence, so after the
first sentence its tokens come from the prefix cache and only the new sentence is
computed. Uses only the public API (miaotui.LLM, SamplingParams).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable, Iterator

import pysbd

from common import add_model_args, fail, load_llm, ms, summary, write_json
from miaotui import SamplingParams

# Few-shot examples from English (the model follows a shown pattern better than instructions).
SHOTS = {
    "French": [("Good morning, how are you?", "Bonjour, comment allez-vous ?"),
               ("The museum is closed on Mondays.", "Le musée est fermé le lundi."),
               ("I am looking for the station.", "Je cherche la gare.")],
    "Spanish": [("Good morning, how are you?", "Buenos días, ¿cómo está?"),
                ("The museum is closed on Mondays.", "El museo está cerrado los lunes."),
                ("I am looking for the station.", "Busco la estación.")],
    "German": [("Good morning, how are you?", "Guten Morgen, wie geht es Ihnen?"),
               ("The museum is closed on Mondays.", "Das Museum ist montags geschlossen."),
               ("I am looking for the station.", "Ich suche den Bahnhof.")],
}


def sentences(lines: Iterable[str], language: str = "en") -> Iterator[tuple[str | None, float]]:
    """(sentence, the time it was complete) as the text arrives, and (None, time) where a
    paragraph ends. A sentence is complete once the text after it has started, its line
    is over and ends the sentence, or the paragraph or input ends."""
    splitter = pysbd.Segmenter(language=language, clean=False)
    buffer, in_paragraph = "", False
    for line in lines:
        now = time.perf_counter()
        if not line.strip():                              # a blank line ends the paragraph
            for s in _split(splitter, buffer):
                yield s, now
            if in_paragraph:
                yield None, now
            buffer, in_paragraph = "", False
            continue
        in_paragraph = True
        buffer += line.rstrip("\n") + " "
        parts = _split(splitter, buffer)
        ended = buffer.rstrip().endswith((".", "!", "?", "…", '"', "'", ")"))
        for s in parts if ended else parts[:-1]:
            yield s, now
        buffer = "" if ended else (parts[-1] + " " if parts else "")
    for s in _split(splitter, buffer):
        yield s, time.perf_counter()


def _split(splitter, text: str) -> list[str]:
    return [s.strip() for s in splitter.segment(text) if s.strip()] if text.strip() else []


class Translator:
    def __init__(self, llm, source: str, target: str, max_tokens: int):
        self.llm = llm
        shots = SHOTS.get(target, []) if source == "English" else []
        self.messages = [{"role": "system", "content": f"You translate {source} into {target}. "
                          f"Reply with the {target} translation only."}]
        for src, dst in shots:
            self.messages += [{"role": "user", "content": src}, {"role": "assistant", "content": dst}]
        # a sentence's translation is one line; greedy, so the same text gives the same output
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"])

    def stream(self, sentence: str) -> Iterator[str]:
        prompt = self.llm.apply_chat_template(self.messages + [{"role": "user", "content": sentence}])
        for step in self.llm.stream(prompt, self.params):
            if step.outputs[0].delta_text:
                yield step.outputs[0].delta_text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", default="-", help="text to translate (default: stdin)")
    p.add_argument("--from", dest="source", default="English")
    p.add_argument("--to", dest="target", default="French")
    p.add_argument("--max-tokens", type=int, default=96, help="most tokens per sentence")
    add_model_args(p)
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        fail("--max-tokens must be at least 1")
    try:
        source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    except OSError as exc:
        fail(f"{args.file}: {exc.strerror}")
    llm = load_llm(args)
    translator = Translator(llm, args.source, args.target, args.max_tokens)
    out = sys.stdout
    records = []
    with source:
        for sentence, ready in sentences(source):
            if sentence is None:
                out.write("\n\n")
                continue
            first, words, start = None, [], time.perf_counter()
            for piece in translator.stream(sentence):
                if first is None:
                    first = time.perf_counter()
                    piece = piece.lstrip()
                words.append(piece)
                out.write(piece)
                out.flush()
            done = time.perf_counter()
            out.write(" ")
            out.flush()
            records.append({"sentence": sentence, "translation": "".join(words).strip(),
                            "first_token_s": (first or done) - ready, "latency_s": done - ready,
                            "translate_s": done - start})
    out.write("\n")
    if not records:
        fail("no text to translate")
    latency = summary([r["latency_s"] for r in records])
    first = summary([r["first_token_s"] for r in records])
    own = summary([r["translate_s"] for r in records])
    print(f"[{len(records)} sentences: latency per sentence {ms(latency)}; first translated "
          f"token {ms(first)}; translating alone (no wait behind earlier sentences) {ms(own)}]",
          file=sys.stderr)
    write_json(args.json, {"example": "translate", "source": args.source, "target": args.target,
                           "latency_s": latency, "first_token_s": first, "translate_s": own,
                           "sentences": records})


if __name__ == "__main__":
    main()
