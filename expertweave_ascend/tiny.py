"""The embedded tiny model: a real DeepseekV2ForCausalLM checkpoint, its tokenizer, and ESFT adapters.

Small enough to build in seconds on a CPU, shaped like DeepSeek-V2-Lite where it matters (dense first
layer, routed + shared experts, greedy top-k softmax routing, MLA attention with the dimensions the
vLLM CPU backend accepts). Everything is derived from the seed, so two builds are byte-identical.
"""

import json
import random
from pathlib import Path

import torch

from .adapters import save_adapter

ADAPTER_NAMES = ["law", "math", "code", "intent", "summary", "translation"]
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_WORDS = (
    "the court held that a contract requires offer acceptance and consideration between parties "
    "solve for x when two plus three times x equals eleven then check the answer "
    "define a function that returns the sum of a list of numbers in python "
    "the user wants to book a flight from paris to tokyo next monday morning "
    "in summary the report finds that expert models share most of their weights "
    "translate the sentence into french please and keep the meaning exact "
    "a mixture of experts routes each token to a few experts chosen by a router "
    "memory is mapped in granules and each adapter adds only the experts it tuned"
).split()


def tiny_config(vocab_size: int) -> dict:
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 64,
        "v_head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.05,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def build_tokenizer(out: Path, seed: int, vocab_size: int = 1024) -> int:
    """Trains a byte-level BPE on text generated here; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 20))) for _ in range(3000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "add_bos_token": True, "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    return tokenizer.get_vocab_size()


def _adapter_layout(index: int, moe_layers: list[int], num_experts: int, rng: random.Random) -> dict[int, list[int]]:
    """One layer tunes nothing, one tunes half the experts, the others a few: like real ESFT spreads."""
    none_layer = moe_layers[index % len(moe_layers)]
    many_layer = moe_layers[(index + 1) % len(moe_layers)]
    layout = {}
    for layer in moe_layers:
        count = 0 if layer == none_layer else num_experts // 2 if layer == many_layer else rng.randint(1, 4)
        layout[layer] = sorted(rng.sample(range(num_experts), count))
    return layout


def make_tiny(out: str | Path, adapters: int = 3, seed: int = 0, decisive: bool = False,
              delta_spread: tuple[float, float] | None = None) -> dict[str, Path]:
    """Writes OUT/base and OUT/adapters/<name>; returns {name: adapter path}. decisive: see make_decisive;
    delta_spread: see make_model."""
    names = [ADAPTER_NAMES[i] if i < len(ADAPTER_NAMES) else f"task{i}" for i in range(adapters)]
    config = tiny_config(0)
    moe_layers = list(range(config["first_k_dense_replace"], config["num_hidden_layers"]))
    layouts = {name: _adapter_layout(i, moe_layers, config["n_routed_experts"], random.Random(f"{seed}-{name}"))
               for i, name in enumerate(names)}
    return make_model(out, layouts, seed=seed, decisive=decisive, delta_spread=delta_spread)


def make_model(out: str | Path, layouts: dict[str, dict[int, list[int]]], seed: int = 0, decisive: bool = False,
               delta_spread: tuple[float, float] | None = None, **config_overrides) -> dict[str, Path]:
    """A base checkpoint of tiny_config (with overrides) and one adapter per layout {layer: expert ids}.
    Each tuned expert is its base expert plus a random delta: by default a strong fine-tune (several
    times the weights' own scale); with delta_spread (lo, hi) the delta's relative size ||delta|| / ||w||
    is drawn log-uniformly from [lo, hi] per expert, as fine-tuning leaves some experts nearly untouched
    and changes others much (in bfloat16, deltas below about 0.2% leave many weights unchanged)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    out = Path(out)
    base_dir = out / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(base_dir, seed)
    config_dict = {**tiny_config(vocab_size), **config_overrides}
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**config_dict)).to(torch.bfloat16)
    model.save_pretrained(base_dir)
    (base_dir / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((base_dir / "config.json").read_text())

    moe_layers = list(range(config_dict["first_k_dense_replace"], config_dict["num_hidden_layers"]))
    std = config_dict["initializer_range"]
    paths, tuned = {}, {}
    for name, layout in layouts.items():
        noise = torch.Generator().manual_seed(random.Random(f"{seed}-{name}-weights").getrandbits(63))
        experts = {}
        for layer, ids in layout.items():
            fused = model.model.layers[layer].mlp.experts
            experts[layer] = {}
            for e in ids:
                gate, up = fused.gate_up_proj[e].detach().float().chunk(2, dim=0)
                down = fused.down_proj[e].detach().float()
                deltas = [torch.randn(w.shape, generator=noise) for w in (gate, up, down)]
                if delta_spread is None:
                    scale = 4 * std  # a strong fine-tune: several times the weights' own scale
                else:
                    lo, hi = delta_spread
                    relative = lo * (hi / lo) ** float(torch.rand((), generator=noise))
                    scale = relative * _norm((gate, up, down)) / _norm(deltas)
                experts[layer][e] = tuple((w + scale * d).to(torch.bfloat16) for w, d in zip((gate, up, down), deltas))
        paths[name] = save_adapter(out / "adapters" / name, experts, config=config, listed_layers=moe_layers)
        tuned[name] = experts
    if decisive:
        make_decisive(model, tuned)
        model.save_pretrained(base_dir)
        (base_dir / "generation_config.json").unlink(missing_ok=True)
    return paths


def _norm(tensors) -> float:
    return float(sum(t.square().sum() for t in tensors)) ** 0.5


# -- decisive logits -------------------------------------------------------------------------------------
MARGIN = 1.0  # the perceptron's goal: the top-1 logit leads the runner-up by this many logit standard deviations


@torch.no_grad()
def make_decisive(model, tuned: dict[str, dict[int, dict[int, tuple]]], rounds: int = 1000) -> float:
    """Makes greedy decoding independent of how a batch is composed. In a random model the top-1 and
    top-2 logits drift and cross as a sequence goes on, and where they cross, the rounding of another
    batch shape moves the switch by a token. Here attention's output projection is zeroed, so the next
    token is a function of the current token and the adapter alone (the KV cache is still written and
    read), and the output head is trained, a multiclass perceptron on the final hidden state of every
    token under the base and every adapter, toward each state's own top-1 leading by MARGIN logit
    standard deviations. Returns the smallest lead reached, in those units."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
    states = torch.cat([_token_states(model, experts) for experts in [{}, *tuned.values()]])
    states = states[states.norm(dim=-1) > 0]  # the padding token's embedding is zero: it has no top-1
    head = model.lm_head.weight.float()
    labels = (states @ head.T).argmax(-1)
    for _ in range(rounds):
        lead, runner_up = _leads(states, head, labels)
        short = lead < MARGIN
        if not short.any():
            break
        step = 0.05 * states[short] / states[short].norm(dim=-1, keepdim=True)
        head.index_add_(0, labels[short], step)
        head.index_add_(0, runner_up[short], -step)
    model.lm_head.weight.copy_(head.to(model.lm_head.weight.dtype))
    return float(_leads(states, model.lm_head.weight.float(), labels)[0].min())


def _leads(states: torch.Tensor, head: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each state's label leads the best other token, in logit standard deviations; and that token."""
    logits = states @ head.T
    scale = logits.std(-1)
    rows = torch.arange(len(states))
    own = logits[rows, labels]
    logits[rows, labels] = float("-inf")
    best_other = logits.max(-1)
    return (own - best_other.values) / scale, best_other.indices


def _token_states(model, experts: dict[int, dict[int, tuple]]) -> torch.Tensor:
    """The final hidden state of every vocabulary token alone, with these experts swapped in (float32)."""
    import copy

    variant = copy.deepcopy(model).float()
    for layer, ids in experts.items():
        fused = variant.model.layers[layer].mlp.experts
        for e, (gate, up, down) in ids.items():
            fused.gate_up_proj[e] = torch.cat([gate, up]).float()
            fused.down_proj[e] = down.float()
    tokens = torch.arange(variant.config.vocab_size)[:, None]
    return variant.model(input_ids=tokens).last_hidden_state[:, -1]
