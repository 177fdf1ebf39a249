"""Proof of equality: one mixed batch through ExpertWeave versus each merged model run on its own."""

from pathlib import Path

import torch

from .adapters import validate_adapter
from .geometry import BaseGeometry
from .host_tier import HostTier
from .loader import BackgroundLoader
from .reports import VerifyReport, VerifyRow
from .weave import ExpertWeave, WeaveConfig, slots_needed

DEFAULT_PROMPTS = [
    "the court held that a contract requires",
    "solve for x when two plus three",
    "define a function that returns the sum",
    "the user wants to book a flight from paris",
    "in summary the report finds that expert",
    "translate the sentence into french",
]


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int):
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out.sequences[:, enc["input_ids"].shape[1]:]
    logits = torch.stack(out.logits, dim=1)  # [B, steps, vocab], before any logits processor
    return new_tokens, logits


def _divergence(served, adapter_rows, row: int, oracle, tokenizer, prompts: list[str],
                max_new_tokens: int) -> tuple[float, float]:
    """Greedy token agreement and mean KL(oracle || served) per token, teacher-forced on the oracle's own
    greedy continuation of every prompt: at each of its tokens, do both models pick the same next token,
    and how far apart are their distributions."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(served.device)
    want = _generate(oracle, tokenizer, prompts, max_new_tokens)[0]
    ids = torch.cat([enc["input_ids"], want], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(want)], dim=1)
    adapter_rows.rows = torch.full((len(prompts),), row, dtype=torch.int32, device=served.device)
    got = served(input_ids=ids, attention_mask=mask).logits[:, -max_new_tokens - 1:-1].float().log_softmax(-1)
    ref = oracle(input_ids=ids, attention_mask=mask).logits[:, -max_new_tokens - 1:-1].float().log_softmax(-1)
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    return agreement, max(kl, 0.0)


def verify_hf(base: str | Path, adapters: dict[str, str | Path], max_new_tokens: int = 16,
              prompts: list[str] | None = None, dtype: torch.dtype = torch.float32,
              config: WeaveConfig | None = None, granularity: int | None = None,
              device: str | torch.device = "cpu", consolidate_rel_l2: float | None = None) -> VerifyReport:
    """config: the weave's; by default just enough slots for these adapters, granules of granularity.
    device: where the models run; on a GPU the expert tensors are CUDA virtual memory (the driver's
    granularity) and rerouting runs the CUDA kernel. consolidate_rel_l2: the weave serves near-duplicate
    experts by one copy (sharing.py); each adapter's divergence from its merged model is reported."""
    from transformers import AutoTokenizer

    from .integrations.hf import load_model, merge_adapter, model_nbytes, moe_layer_handles
    from .memory import backend_for

    device = torch.device(device)
    backend = backend_for(device, granularity or (config.granularity if config else None))

    geometry = BaseGeometry.from_checkpoint(base)
    checked = {name: validate_adapter(path, geometry) for name, path in adapters.items()}
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.padding_side = "left"
    prompts = prompts or DEFAULT_PROMPTS
    entries = [None, *adapters]  # None: the base model
    batch_prompts = [prompts[i % len(prompts)] for i in range(len(entries))]

    reference = load_model(base, dtype).to(device)
    served = load_model(base, dtype).to(device)
    model_bytes = model_nbytes(served)
    handles, adapter_rows = moe_layer_handles(served)
    if config is None:
        slots = slots_needed((a.experts for a in checked.values()), geometry.moe_layers)
        config = WeaveConfig(max_adapters=max(1, len(adapters)), adapter_slots=slots,
                             granularity=backend.granularity, consolidate_rel_l2=consolidate_rel_l2)
    weave = ExpertWeave(geometry, handles, config, backend=backend, device=device)
    loader = BackgroundLoader(weave, HostTier(0))  # loaded as a server loads them: on the loader thread
    try:
        for name, path in adapters.items():
            loader.start(name, path)
        loader.wait(set(adapters))
        adapter_rows.rows = torch.tensor([weave.begin_request(name) for name in entries], dtype=torch.int32,
                                         device=device)
        with torch.no_grad():
            tokens, logits = _generate(served, tokenizer, batch_prompts, max_new_tokens)
        rows = {}
        for i, name in enumerate(entries):
            oracle = reference if name is None else merge_adapter(reference, checked[name])
            with torch.no_grad():
                want_tokens, want_logits = _generate(oracle, tokenizer, [batch_prompts[i]], max_new_tokens)
                base_tokens = want_tokens if name is None else _generate(reference, tokenizer, [batch_prompts[i]],
                                                                         max_new_tokens)[0]
                divergence = (None, None) if name is None else _divergence(
                    served, adapter_rows, weave.adapter(name).row, oracle, tokenizer, prompts, max_new_tokens)
            equal = torch.equal(tokens[i], want_tokens[0])
            # Logits are comparable only while the two runs have seen the same tokens.
            same = int((tokens[i] != want_tokens[0]).nonzero()[0, 0]) + 1 if not equal else max_new_tokens
            rows[name] = VerifyRow(batch_prompts[i], tokenizer.decode(tokens[i], skip_special_tokens=True), equal,
                                   (logits[i, :same] - want_logits[0, :same]).abs().max().item(),
                                   None if name is None else not torch.equal(base_tokens[0], want_tokens[0]),
                                   *divergence)
        for name in entries:
            weave.end_request(name)
        memory = weave.memory_report(model_bytes=model_bytes)
    finally:
        loader.close()
        weave.close()
        backend.close()

    base_row = rows.pop(None)
    return VerifyReport("hf", "logits", str(device), str(base), str(dtype).removeprefix("torch."), max_new_tokens,
                        base_row, rows, memory, config.consolidate_rel_l2, len(prompts))
