//! Hugging Face tokenizers as the frozen text encoders use them: a fixed length, padded
//! and truncated, from `tokenizer.json` or a CLIP tokenizer's `vocab.json` + `merges.txt`.

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::path::Path;

/// A tokenizer padded and truncated to `len` tokens.
pub struct Tok {
    tok: tokenizers::Tokenizer,
    len: usize,
}

impl Tok {
    /// `dir/tokenizer.json` (or a CLIP tokenizer's vocab.json + merges.txt), padding with the
    /// pad token its `special_tokens_map.json` names
    /// (else `default_pad`).
    pub fn load(dir: &Path, len: usize, default_pad: &str) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        let mut tok = if p.is_file() {
            tokenizers::Tokenizer::from_file(&p).map_err(|e| anyhow::anyhow!("{}: cannot load ({e})", p.display()))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            clip_tokenizer_from_files(dir)?
        } else {
            anyhow::bail!("{}: neither tokenizer.json nor vocab.json + merges.txt", dir.display());
        };
        let pad_token = std::fs::read_to_string(dir.join("special_tokens_map.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pad_token"].as_str().map(str::to_string).or_else(|| v["pad_token"]["content"].as_str().map(str::to_string)))
            .unwrap_or_else(|| default_pad.to_string());
        let pad_id = tok.token_to_id(&pad_token).unwrap_or(0);
        tok.with_truncation(Some(tokenizers::TruncationParams { max_length: len, ..Default::default() })).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        tok.with_padding(Some(tokenizers::PaddingParams { strategy: tokenizers::PaddingStrategy::Fixed(len), pad_id, pad_token, ..Default::default() }));
        Ok(Self { tok, len })
    }
    pub fn ids(&self, texts: &[String], device: &Device) -> Result<Tensor> {
        crate::encoders::clip::tokenize(&self.tok, texts, self.len, device)
    }
}

/// A CLIP tokenizer from the slow tokenizer's `vocab.json` + `merges.txt` (what diffusers'
/// SD3 and FLUX `tokenizer/` folders hold), built as transformers' CLIPTokenizerFast
/// conversion builds it: NFC, whitespace runs to one space, lowercase; CLIP's split
/// pattern; byte-level BPE with `</w>` word ends; `<|startoftext|>` … `<|endoftext|>`.
pub fn clip_tokenizer_from_files(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(crate::weights::hf::read_json(&vocab_path)?).map_err(|e| anyhow::anyhow!("{}: not a vocabulary ({e})", vocab_path.display()))?;
    let merges_path = dir.join("merges.txt");
    let text = std::fs::read_to_string(&merges_path).map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", merges_path.display()))?;
    let merges: Vec<[&str; 2]> = text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| l.split_once(' ').map(|(a, b)| [a, b]).ok_or_else(|| anyhow::anyhow!("{}: line {l:?} is not a merge pair", merges_path.display())))
        .collect::<Result<_>>()?;
    let id = |t: &str| vocab.get(t).and_then(|v| v.as_u64()).ok_or_else(|| anyhow::anyhow!("{}: no token {t}", vocab_path.display()));
    let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let special = |t: &str, i: u64| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special("<|startoftext|>", bos), special("<|endoftext|>", eos)],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    json.to_string().parse::<tokenizers::Tokenizer>().map_err(|e| anyhow::anyhow!("{}: cannot build a CLIP tokenizer from vocab.json + merges.txt ({e})", dir.display()))
}
