"""Benchmark workloads: fixed or uniformly random lengths, or a ShareGPT JSON file."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

# plain words that most tokenizers keep as one token each (with their leading space)
WORDS = ("the of and to in is was for on that with as by at from his her it he she they "
         "we you this are be had have not but all were when there can an which their said "
         "one do if will each about how up out them then many some so these would other into "
         "has more two like him see time could no make than first been its who now people my "
         "made over did down only way find use may water long little very after words called "
         "just where most know get through back much before go good new write our used me man "
         "too any day same right look think also around another came come work three word must "
         "because does part even place well such here take why things help put years different").split()


@dataclass
class Request:
    prompt_ids: list[int] | None
    output_len: int
    prompt: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids) if self.prompt_ids is not None else len(self.prompt.split())


def parse_range(text: str) -> tuple[int, int]:
    """"128" -> (128, 128); "32-512" -> (32, 512)."""
    lo, _, hi = str(text).partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 0 < lo <= hi:
        raise ValueError(f"bad length range {text!r} (want N or LO-HI with 0 < LO <= HI)")
    return lo, hi


def random_requests(n: int, input_len: str | tuple, output_len: str | tuple,
                    vocab_size: int, seed: int = 0, text: bool = False) -> list[Request]:
    """n requests with lengths uniform in the given ranges; prompts of random token ids
    (avoiding the lowest 300 ids, where special tokens usually sit) or, with `text`,
    random words (about one token per word)."""
    rng = random.Random(seed)
    lo_in, hi_in = input_len if isinstance(input_len, tuple) else parse_range(input_len)
    lo_out, hi_out = output_len if isinstance(output_len, tuple) else parse_range(output_len)
    out = []
    for i in range(n):
        p, o = rng.randint(lo_in, hi_in), rng.randint(lo_out, hi_out)
        if text:
            words = [str(i)] + [rng.choice(WORDS) for _ in range(p - 1)]
            out.append(Request(None, o, " ".join(words)))
        else:
            low = min(300, vocab_size // 2)
            out.append(Request([rng.randrange(low, vocab_size) for _ in range(p)], o))
    return out


def sharegpt_requests(path: str, n: int, tokenizer=None, max_len: int = 2048,
                      seed: int = 0) -> list[Request]:
    """The first human turn of each ShareGPT conversation as the prompt and the reply's
    token count as the output length; shuffled, too short or too long ones skipped."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    random.Random(seed).shuffle(data)
    out = []
    for item in data:
        conv = item.get("conversations") or item.get("conversation") or []
        if len(conv) < 2:
            continue
        prompt, reply = conv[0].get("value", ""), conv[1].get("value", "")
        if tokenizer is not None:
            ids = tokenizer.encode(prompt)
            o = len(tokenizer.encode(reply, add_special_tokens=False))
        else:
            ids, o = None, len(reply.split())
        p = len(ids) if ids is not None else len(prompt.split())
        if p < 4 or o < 4 or p + o > max_len:
            continue
        out.append(Request(ids, o, prompt))
        if len(out) == n:
            break
    return out
