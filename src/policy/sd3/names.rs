//! How SD3's single-file (Stability AI) names map to diffusers' module names, layer by
//! layer: the table the layout conversion and the LoRA adapters' diffusers names share.

/// Renames outside the blocks: (single-file, diffusers).
pub const GLOBAL: &[(&str, &str)] = &[
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    ("x_embedder.proj.bias", "pos_embed.proj.bias"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
];

/// Renames inside block i: (single-file suffix, diffusers suffix). The fused qkv tensors
/// are split / joined separately.
pub const BLOCK: &[(&str, &str)] = &[
    ("x_block.attn.ln_q", "attn.norm_q"),
    ("x_block.attn.ln_k", "attn.norm_k"),
    ("context_block.attn.ln_q", "attn.norm_added_q"),
    ("context_block.attn.ln_k", "attn.norm_added_k"),
    ("x_block.attn.proj", "attn.to_out.0"),
    ("context_block.attn.proj", "attn.to_add_out"),
    ("x_block.attn2.ln_q", "attn2.norm_q"),
    ("x_block.attn2.ln_k", "attn2.norm_k"),
    ("x_block.attn2.proj", "attn2.to_out.0"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
];

/// Fused qkv (single-file) ↔ its three diffusers projections.
pub const QKV: &[(&str, [&str; 3])] = &[
    ("x_block.attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("context_block.attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("x_block.attn2.qkv", ["attn2.to_q", "attn2.to_k", "attn2.to_v"]),
];

/// Whether tensor `stem` (a name without `.weight`/`.bias`, or a bare tensor name) must
/// have its halves swapped between layouts: the final adaLN and the last block's
/// pre-only context adaLN.
pub fn swapped(sai_stem: &str, depth: usize) -> bool {
    sai_stem == "final_layer.adaLN_modulation.1" || sai_stem == format!("joint_blocks.{}.context_block.adaLN_modulation.1", depth - 1)
}

/// The diffusers module names of the single-file linear layer `sai` (a path without
/// `.weight`) in a model of `depth` blocks: three for a fused qkv (row blocks q, k, v), one
/// otherwise; and whether its output halves are swapped between the layouts (the two
/// continuous adaLN layers). None for a name outside the layout.
pub fn diffusers_modules(sai: &str, depth: usize) -> Option<(Vec<String>, bool)> {
    let swap = swapped(sai, depth);
    if let Some((_, d)) = GLOBAL.iter().find(|(s, _)| *s == sai) {
        return Some((vec![d.to_string()], swap));
    }
    let (i, within) = sai.strip_prefix("joint_blocks.")?.split_once('.')?;
    if let Some((_, parts)) = QKV.iter().find(|(s, _)| *s == within) {
        return Some((parts.iter().map(|p| format!("transformer_blocks.{i}.{p}")).collect(), swap));
    }
    BLOCK.iter().find(|(s, _)| *s == within).map(|(_, d)| (vec![format!("transformer_blocks.{i}.{d}")], swap))
}

/// [`diffusers_modules`] in the form [`crate::policy::nn::adapted::DiffusersNames`] takes (equal row
/// shares).
pub fn diffusers_parts(sai: &str, depth: usize) -> Option<(Vec<(String, usize)>, bool)> {
    diffusers_modules(sai, depth).map(|(names, swapped)| (names.into_iter().map(|n| (n, 0)).collect(), swapped))
}
