"""Golden fixtures for vipo's CLIP-family rewards (src/reward/clip.rs).

Run by hand in a throw-away virtualenv with torch, transformers and tokenizers:
    python tools/golden/clip_tiny.py tests/data/clip_tiny
Writes a tiny random CLIPModel in the Hugging Face layout (config.json, model.safetensors,
tokenizer.json), a small RGB test image, and golden.json: token ids, the processor's
pixel values, image/text embeddings, CLIP cosines and PickScore-style scores, computed
by transformers itself. Two towers' activations differ on purpose (quick_gelu text,
gelu vision) because OpenAI's CLIP uses quick_gelu and the ViT-H models gelu.
"""
import json, os, sys
import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast, CLIPImageProcessorPil as CLIPImageProcessor  # PIL resize, as the CLIP-family references

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)

# A tiny CLIP BPE vocabulary: the special tokens, bytes for the letters used, a few merges.
words = ["a", "red", "cat", "on", "blue", "square", "photo", "of", "dog"]
chars = sorted(set("".join(words)))
vocab = {}
for c in chars:
    vocab[c] = len(vocab)
for c in chars:
    vocab[c + "</w>"] = len(vocab)
merges = []
for w in words:
    # merge the word left to right into one token
    parts = list(w[:-1]) + [w[-1] + "</w>"]
    while len(parts) > 1:
        a, b = parts[0], parts[1]
        merges.append(f"{a} {b}")
        parts = [a + b] + parts[2:]
        if parts[0] not in vocab:
            vocab[parts[0]] = len(vocab)
vocab["<|startoftext|>"] = len(vocab)
vocab["<|endoftext|>"] = len(vocab)
seen = set(); merges = [m for m in merges if not (m in seen or seen.add(m))]
with open(os.path.join(out, "vocab.json"), "w") as f: json.dump(vocab, f)
with open(os.path.join(out, "merges.txt"), "w") as f: f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
tok = CLIPTokenizerFast(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"))
tok.save_pretrained(out)
os.remove(os.path.join(out, "vocab.json")); os.remove(os.path.join(out, "merges.txt"))
for extra in ["tokenizer_config.json", "special_tokens_map.json"]:
    p = os.path.join(out, extra)
    if os.path.exists(p): os.remove(p)

cfg = CLIPConfig(
    text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                     bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
    vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8, hidden_act="gelu"),
    projection_dim=16, logit_scale_init_value=2.6592,
)
model = CLIPModel(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    model.logit_scale.fill_(4.2)
model.save_pretrained(out, safe_serialization=True)

proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
proc.save_pretrained(out)
rng = np.random.default_rng(0)
img = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
img[8:30, 10:30] = [220, 30, 40]
Image.fromarray(img).save(os.path.join(out, "image.png"))
prompts = ["a red cat", "a photo of a blue square", "a dog on a red square"]
enc = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
pix = proc(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    ie = model.get_image_features(pixel_values=pix)
    te = model.get_text_features(input_ids=enc["input_ids"])
    if not torch.is_tensor(ie): ie = ie.pooler_output
    if not torch.is_tensor(te): te = te.pooler_output
    ien = ie / ie.norm(dim=-1, keepdim=True); ten = te / te.norm(dim=-1, keepdim=True)
    cos = (ten @ ien.T)[:, 0]
# LAION's aesthetic predictor head (improved-aesthetic-predictor's MLP: Linear layers at
# indices 0, 2, 4, 6, 7 with dropouts between, no activations) on normalised image embeddings.
mlp = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Dropout(0.2), torch.nn.Linear(24, 12), torch.nn.Dropout(0.2),
                          torch.nn.Linear(12, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)).eval()
torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, os.path.join(out, "aesthetic.pth"))
with torch.no_grad():
    aesthetic = mlp(ien)[:, 0]
with torch.no_grad():
    # What SD3's text conditioning takes from a CLIP text tower: the penultimate layer's
    # hidden states (hidden_states[-2], before the final layer norm) and the projected pooled
    # embedding (CLIPTextModelWithProjection.text_embeds).
    th = model.text_model(input_ids=enc["input_ids"], output_hidden_states=True)
    penultimate = th.hidden_states[-2]
golden = {
    "penultimate": penultimate.flatten().tolist(),
    "aesthetic": aesthetic.tolist(),
    "prompts": prompts,
    "input_ids": enc["input_ids"].tolist(),
    "pixel_values": pix[0].flatten().tolist(),
    "image_embeds": ie[0].tolist(),
    "text_embeds": te.tolist(),
    "cosine": cos.tolist(),
    "pickscore": (model.logit_scale.exp() * cos).tolist(),
}
with open(os.path.join(out, "golden.json"), "w") as f: json.dump(golden, f)
print("wrote", out, {k: (len(v) if isinstance(v, list) else v) for k, v in golden.items()})
