"""Tiny transformers models built from configs (no downloads) for integration tests."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def build(kind, seed=0, dtype=torch.float32, intermediate_size=96):
    """A 2-layer model of ``kind`` with its own dropouts off (only LoRA dropout stays random)."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, num_labels=3)
        model = transformers.BertForSequenceClassification(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype)


def batch(kind, seed=1, B=2, T=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, 3, (B,), generator=g) if kind == "bert" else ids
    return {"input_ids": ids, "labels": labels}


def randomize_lora_B(model, std=0.1, seed=2):
    """PEFT/fastlora init B = 0; give B values so the LoRA branch (and dA) is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
