"""Named shape sets from real models: LoRA-targeted linear layers as (name, K, N).

K = in_features, N = out_features, from each model's published config (hidden_size,
intermediate_size, num_attention_heads, num_key_value_heads; head_dim = hidden / heads).
"""

SHAPE_SETS = {
    # meta-llama/Meta-Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads
    "llama3-8b": [("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("v_proj", 4096, 1024), ("o_proj", 4096, 4096),
                  ("gate_proj", 4096, 14336), ("up_proj", 4096, 14336), ("down_proj", 14336, 4096)],
    # Qwen/Qwen2.5-7B: hidden 3584, intermediate 18944, 28 heads, 4 KV heads (head_dim 128)
    "qwen2.5-7b": [("q_proj", 3584, 3584), ("k_proj", 3584, 512), ("v_proj", 3584, 512), ("o_proj", 3584, 3584),
                   ("gate_proj", 3584, 18944), ("up_proj", 3584, 18944), ("down_proj", 18944, 3584)],
    # mistralai/Mistral-7B-v0.1: hidden 4096, intermediate 14336, 32 heads, 8 KV heads
    "mistral-7b": [("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("v_proj", 4096, 1024), ("o_proj", 4096, 4096),
                   ("gate_proj", 4096, 14336), ("up_proj", 4096, 14336), ("down_proj", 14336, 4096)],
    # Qwen/Qwen2.5-1.5B: hidden 1536, intermediate 8960, 12 heads, 2 KV heads (head_dim 128)
    "qwen2.5-1.5b": [("q_proj", 1536, 1536), ("k_proj", 1536, 256), ("v_proj", 1536, 256), ("o_proj", 1536, 1536),
                     ("gate_proj", 1536, 8960), ("up_proj", 1536, 8960), ("down_proj", 8960, 1536)],
    # sentence-transformers/all-MiniLM-L6-v2 (the README's main job): hidden 384, intermediate 1536
    "minilm": [("query", 384, 384), ("intermediate.dense", 384, 1536), ("output.dense", 1536, 384)],
    # HuggingFaceTB/SmolLM2-135M: hidden 576, intermediate 1536, 9 heads, 3 KV heads (head_dim 64)
    "smollm2-135m": [("q_proj", 576, 576), ("k_proj", 576, 192), ("v_proj", 576, 192), ("o_proj", 576, 576),
                     ("gate_proj", 576, 1536), ("up_proj", 576, 1536), ("down_proj", 1536, 576)],
    # CPU smoke test: tiny, odd sizes
    "smoke": [("tiny-odd", 70, 45)],
}

RANKS = (8, 16, 64)
TOKENS = (512, 1024, 2048, 4096, 8192, 16384)


def unique_layers(set_name):
    """Layers of a set with distinct (K, N): k/v and gate/up share a shape."""
    seen, out = set(), []
    for name, K, N in SHAPE_SETS[set_name]:
        if (K, N) not in seen:
            seen.add((K, N))
            out.append((name, K, N))
    return out
