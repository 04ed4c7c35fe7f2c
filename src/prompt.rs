//! Prompts at the boundary between the data and every model and reward: free text, plus
//! the ShapeWorld scene it describes when it has one (what the rule-based rewards need),
//! plus optional metadata from a JSONL prompt file (what a user's reward may need, in the
//! way Flow-GRPO passes `metadata` next to `prompts`).
//!
//! Prompt files: one prompt per line (`.txt`; blank lines and `#` comments skipped), or
//! JSONL (`.jsonl`; one object per line with a string field `"prompt"`, every other field
//! kept as metadata). A line that is neither is an error naming the file and the line.

use anyhow::{bail, Context, Result};
use std::path::Path;

use crate::world::video::VideoSpec;
use crate::world::PromptSpec;

/// The scene a ShapeWorld prompt describes (parsed from its text).
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Image(PromptSpec),
    Video(VideoSpec),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub text: String,
    /// The ShapeWorld scene, when the text is one of the grammar's prompts.
    pub spec: Option<Spec>,
    /// Extra fields of a JSONL prompt line (empty otherwise).
    pub meta: serde_json::Map<String, serde_json::Value>,
}

impl Prompt {
    /// Free text; recognised as a ShapeWorld image or video prompt when it parses as one.
    pub fn text(text: &str) -> Self {
        let spec = PromptSpec::parse(text).ok().filter(|s| s.validate().is_ok()).map(Spec::Image).or_else(|| VideoSpec::parse(text).ok().filter(|s| s.validate().is_ok()).map(Spec::Video));
        Self { text: text.trim().to_string(), spec, meta: Default::default() }
    }

    pub fn image(spec: &PromptSpec) -> Self {
        Self { text: spec.text(), spec: Some(Spec::Image(spec.clone())), meta: Default::default() }
    }

    pub fn video(spec: &VideoSpec) -> Self {
        Self { text: spec.text(), spec: Some(Spec::Video(spec.clone())), meta: Default::default() }
    }

    pub fn image_spec(&self) -> Option<&PromptSpec> {
        match &self.spec {
            Some(Spec::Image(s)) => Some(s),
            _ => None,
        }
    }

    pub fn video_spec(&self) -> Option<&VideoSpec> {
        match &self.spec {
            Some(Spec::Video(s)) => Some(s),
            _ => None,
        }
    }
}

/// `n` ShapeWorld prompts of `split` drawn with `seed` for a generator that samples
/// `kind`: scenes for image generators (the ShapeWorld policy, and as free text SD3 /
/// FLUX), motion scenes for video.
pub fn grammar_prompts(kind: crate::image::SampleKind, split: crate::world::Split, n: usize, seed: u64) -> Vec<Prompt> {
    match kind {
        crate::image::SampleKind::Images => crate::world::prompts(split, n, seed).iter().map(Prompt::image).collect(),
        crate::image::SampleKind::Clips => crate::world::video::video_prompts(split, n, seed).iter().map(Prompt::video).collect(),
    }
}

/// The ShapeWorld image scenes of `prompts`, for a consumer (`who`) that needs them.
pub fn image_specs(prompts: &[Prompt], who: &str) -> Result<Vec<PromptSpec>> {
    prompts.iter().enumerate().map(|(i, p)| p.image_spec().cloned().with_context(|| format!("{who} needs ShapeWorld image prompts; prompt {i} ({:?}) is not one", p.text))).collect()
}

/// The ShapeWorld video scenes of `prompts`, for a consumer (`who`) that needs them.
pub fn video_specs(prompts: &[Prompt], who: &str) -> Result<Vec<VideoSpec>> {
    prompts.iter().enumerate().map(|(i, p)| p.video_spec().cloned().with_context(|| format!("{who} needs ShapeWorld video prompts; prompt {i} ({:?}) is not one", p.text))).collect()
}

/// Read a prompt file (`.jsonl` as JSON lines, anything else as one prompt per line).
pub fn read_prompt_file(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read prompt file", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let t = line.trim();
        if jsonl {
            if t.is_empty() {
                bail!("{}: empty line (JSONL needs one object per line)", at());
            }
            let v: serde_json::Value = serde_json::from_str(t).with_context(|| format!("{}: invalid JSON", at()))?;
            let serde_json::Value::Object(mut obj) = v else { bail!("{}: expected a JSON object with a \"prompt\" field", at()) };
            let p = match obj.remove("prompt") {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s,
                Some(serde_json::Value::String(_)) => bail!("{}: field \"prompt\" is empty", at()),
                Some(_) => bail!("{}: field \"prompt\" must be a string", at()),
                None => bail!("{}: no \"prompt\" field", at()),
            };
            let mut prompt = Prompt::text(&p);
            prompt.meta = obj;
            out.push(prompt);
        } else {
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            out.push(Prompt::text(t));
        }
    }
    anyhow::ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}

/// `n` prompts of a file for a fixed evaluation set: all of them in file order when
/// `n` is 0 or covers the file, else a seeded choice of `n` (the same for every run).
pub fn fixed_subset(prompts: &[Prompt], n: usize, seed: u64) -> Vec<Prompt> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if n == 0 || n >= prompts.len() {
        return prompts.to_vec();
    }
    let mut idx: Vec<usize> = (0..prompts.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(n);
    idx.sort_unstable();
    idx.into_iter().map(|i| prompts[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn text_prompts_recognise_shapeworld_scenes() {
        let p = Prompt::text("two red circles left of a blue square");
        assert_eq!(p.image_spec().unwrap().text(), "two red circles left of a blue square");
        assert!(Prompt::text("a photo of a cat").spec.is_none());
        let v = crate::world::video::video_prompts(crate::world::Split::Train, 1, 3).remove(0);
        assert_eq!(Prompt::text(&v.text()).video_spec(), Some(&v));
        let e = image_specs(&[Prompt::text("a photo of a cat")], "reward 'compositional'").unwrap_err().to_string();
        assert!(e.contains("compositional") && e.contains("cat"), "{e}");
    }

    #[test]
    fn prompt_files_lines_and_jsonl() {
        let d = tempfile::tempdir().unwrap();
        let txt = write(&d, "p.txt", "# train prompts\na photo of a cat\n\n  a red circle  \n");
        let ps = read_prompt_file(&txt).unwrap();
        assert_eq!(ps.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(), ["a photo of a cat", "a red circle"]);
        assert!(ps[1].image_spec().is_some());
        let jl = write(&d, "p.jsonl", "{\"prompt\": \"a dog\", \"tag\": \"animals\", \"n\": 2}\n{\"prompt\": \"a blue square\"}\n");
        let ps = read_prompt_file(&jl).unwrap();
        assert_eq!(ps[0].text, "a dog");
        assert_eq!(ps[0].meta["tag"], "animals");
        assert_eq!(ps[0].meta.len(), 2);
        assert!(ps[1].meta.is_empty() && ps[1].image_spec().is_some());
    }

    /// Every malformed file is refused with its path, line and what is wrong.
    #[test]
    fn bad_prompt_files_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        for (name, body, want) in [
            ("a.jsonl", "{\"prompt\": \"x\"}\n\n", "a.jsonl:2: empty line"),
            ("b.jsonl", "{\"prompt\": \"x\"}\n{\"prompt\": \"y\"\n", "b.jsonl:2: invalid JSON"),
            ("c.jsonl", "[1, 2]\n", "c.jsonl:1: expected a JSON object"),
            ("d.jsonl", "{\"text\": \"x\"}\n", "d.jsonl:1: no \"prompt\" field"),
            ("e.jsonl", "{\"prompt\": 3}\n", "e.jsonl:1: field \"prompt\" must be a string"),
            ("f.jsonl", "{\"prompt\": \"  \"}\n", "f.jsonl:1: field \"prompt\" is empty"),
            ("g.txt", "# only a comment\n\n", "g.txt: no prompts"),
        ] {
            let e = format!("{:#}", read_prompt_file(&write(&d, name, body)).unwrap_err());
            assert!(e.contains(want), "{name}: {e}");
        }
        let e = format!("{:#}", read_prompt_file(&d.path().join("missing.txt")).unwrap_err());
        assert!(e.contains("missing.txt: cannot read prompt file"), "{e}");
    }

    #[test]
    fn fixed_subset_is_seeded_and_ordered() {
        let ps: Vec<Prompt> = (0..10).map(|i| Prompt::text(&format!("prompt {i}"))).collect();
        assert_eq!(fixed_subset(&ps, 0, 1), ps);
        assert_eq!(fixed_subset(&ps, 20, 1), ps);
        let a = fixed_subset(&ps, 4, 7);
        assert_eq!(a, fixed_subset(&ps, 4, 7));
        assert_eq!(a.len(), 4);
        assert_ne!(a, fixed_subset(&ps, 4, 8));
        let pos: Vec<usize> = a.iter().map(|p| ps.iter().position(|q| q == p).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "file order kept: {pos:?}");
    }
}
