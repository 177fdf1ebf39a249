"""The serving workload: Poisson arrivals, adapter popularity as S-LoRA generates it.

S-LoRA draws each request's adapter as floor(numpy power(alpha) sample * n): alpha 1 is uniform, 0.3 and
0.1 put most requests on the first adapters. Prompts are random token ids of a fixed length (like
`vllm bench serve --dataset-name random`), outputs a fixed number of tokens (ignore_eos), so every engine
does the same work for the same trace.
"""

from dataclasses import dataclass

import numpy as np


FIRST_TOKEN = 3  # the tiny tokenizers' special tokens come first


@dataclass(frozen=True)
class Request:
    arrival_s: float
    adapter: int  # index into the served adapters
    prompt: list[int]
    output_len: int


@dataclass(frozen=True)
class WorkloadConfig:
    requests: int
    rate: float  # requests per second
    alpha: float
    adapters: int
    vocab_size: int  # the model's; token ids are drawn from [FIRST_TOKEN, vocab_size)
    prompt_len: int = 64
    output_len: int = 32
    seed: int = 0


def s_lora_adapters(rng: np.random.Generator, alpha: float, n: int, count: int) -> np.ndarray:
    return np.minimum((rng.power(alpha, count) * n).astype(int), n - 1)


def make_trace(cfg: WorkloadConfig) -> list[Request]:
    rng = np.random.default_rng(cfg.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / cfg.rate, cfg.requests))
    arrivals -= arrivals[0]
    adapters = s_lora_adapters(rng, cfg.alpha, cfg.adapters, cfg.requests)
    prompts = rng.integers(FIRST_TOKEN, cfg.vocab_size, size=(cfg.requests, cfg.prompt_len))
    return [Request(float(t), int(a), p.tolist(), cfg.output_len) for t, a, p in zip(arrivals, adapters, prompts)]
