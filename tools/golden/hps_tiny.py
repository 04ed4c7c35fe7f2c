"""Golden fixture for vipo's HPSv2.1 reward (src/reward/hps.rs).

Run by hand in a throw-away virtualenv with torch and open_clip_torch, after
clip_tiny.py (it reuses that folder's token ids and processed image):
    python tools/golden/hps_tiny.py tests/data/clip_tiny
Writes hps_tiny.pt — a tiny random open_clip CLIP saved the way HPSv2 ships its
checkpoints ({"state_dict": model.state_dict()}, torch.save zip) — and golden_hps.json with
open_clip's image/text features and the HPS score (the cosine of the normalised
features) for the golden pixels and token ids. One head per tower (text width 32, vision
width 64 with head_width 64), as vipo infers open_clip heads: width / 64 (at least 1),
16 for ViT-H (1280) and bigG (1664).
"""
import json, os, sys
import torch
import open_clip
from open_clip.model import CLIP, CLIPVisionCfg, CLIPTextCfg

out = sys.argv[1]
g = json.load(open(os.path.join(out, "golden.json")))
torch.manual_seed(1)
model = CLIP(
    embed_dim=16,
    vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=64, patch_size=8, image_size=32, mlp_ratio=2.0),
    text_cfg=CLIPTextCfg(context_length=16, vocab_size=56, width=32, heads=1, layers=2, mlp_ratio=2.0),
    quick_gelu=False,
).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
torch.save({"state_dict": model.state_dict()}, os.path.join(out, "hps_tiny.pt"))
ids = torch.tensor(g["input_ids"])
pix = torch.tensor(g["pixel_values"]).reshape(1, 3, 32, 32).repeat(3, 1, 1, 1)
with torch.no_grad():
    ie = model.encode_image(pix, normalize=True)
    te = model.encode_text(ids, normalize=True)
    hps = (ie * te).sum(-1)
json.dump({"hps": hps.tolist(), "text_features": model.encode_text(ids).tolist(), "image_features": model.encode_image(pix[:1]).tolist()},
          open(os.path.join(out, "golden_hps.json"), "w"))
print("hps", hps.tolist(), "keys", len(model.state_dict()))
