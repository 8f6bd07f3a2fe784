"""Models and data shared by the distributed workers and the single-process reference."""
import torch

import fastlora

GLOBAL_BATCH = 8


def build_plain(use_dora=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastlora.LoRALinear(32, 48, r=4, lora_alpha=8, use_dora=use_dora), torch.nn.ReLU(),
                                fastlora.LoRALinear(48, 16, r=4, lora_alpha=8, use_dora=use_dora))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.weight.normal_()
            if use_dora:
                layer.lora_magnitude_vector.uniform_(0.5, 1.5)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 16, generator=g)


def build_peft(use_dora=False):
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   use_dora=use_dora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
            if "lora_magnitude_vector" in n:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    ids = torch.randint(0, 64, (GLOBAL_BATCH, 7), generator=torch.Generator().manual_seed(2))
    return pm, ids
