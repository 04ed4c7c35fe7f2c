//! The closed prompt grammar of ShapeWorld: vocabulary enums, [`PromptSpec`],
//! canonical text, parsing and the policy tokenizer.
//!
//! Grammar (lower case, whitespace separated):
//!
//! ```text
//! prompt   := group | group relation group
//! group    := number colour shape        (shape plural iff number > 1)
//! number   := "a" | "one" | "two" | "three" | "four"
//! relation := "left of" | "right of" | "above" | "below"
//! ```
//!
//! A spec has one or two groups, a relation exactly when it has two, 1..=4 objects
//! in total, and its two groups never share the same colour–shape pair (which would
//! make "every A left of every B" ambiguous).

use anyhow::{bail, Result};

/// Object colours. The palette is chosen so that the colours stay far apart from each
/// other and from [`crate::world::BACKGROUND`], which the pixel-level detector relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Cyan,
}

impl Color {
    /// Every colour, in vocabulary order.
    pub const ALL: &'static [Color] = &[Color::Red, Color::Green, Color::Blue, Color::Yellow, Color::Purple, Color::Cyan];

    /// Linear RGB in [0, 1].
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Color::Red => [0.90, 0.12, 0.12],
            Color::Green => [0.12, 0.78, 0.15],
            Color::Blue => [0.15, 0.30, 0.95],
            Color::Yellow => [0.95, 0.88, 0.15],
            Color::Purple => [0.62, 0.15, 0.82],
            Color::Cyan => [0.15, 0.85, 0.88],
        }
    }

    /// The English word.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Cyan => "cyan",
        }
    }

    /// Inverse of [`Color::name`].
    pub fn from_word(word: &str) -> Option<Color> {
        Color::ALL.iter().copied().find(|c| c.name() == word)
    }
}

/// Object shapes. Geometry (half-extent s, centre at the origin, y down):
/// circle radius s; axis-aligned square of side 2s; diamond |x|+|y| ≤ s;
/// triangle with apex (0, −s) and base from (−s, s) to (s, s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
}

impl Shape {
    /// Every shape, in vocabulary order.
    pub const ALL: &'static [Shape] = &[Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond];

    /// Singular English word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
        }
    }

    /// Plural English word.
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Diamond => "diamonds",
        }
    }

    /// Is the point (u, v), in units of the half-extent relative to the centre, inside?
    #[inline]
    pub fn contains_unit(self, u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => u * u + v * v <= 1.0,
            Shape::Square => u.abs() <= 1.0 && v.abs() <= 1.0,
            Shape::Diamond => u.abs() + v.abs() <= 1.0,
            // Width grows linearly from the apex (v = −1) to the base (v = 1).
            Shape::Triangle => v <= 1.0 && u.abs() <= (v + 1.0) * 0.5,
        }
    }

    /// Area divided by s² (s = half-extent).
    pub fn area_factor(self) -> f32 {
        match self {
            Shape::Circle => std::f32::consts::PI,
            Shape::Square => 4.0,
            Shape::Triangle | Shape::Diamond => 2.0,
        }
    }

    /// Vertical offset of the area centroid below the nominal centre, in units of s
    /// (only the triangle's centroid is off-centre: the mean of its vertices).
    pub fn centroid_dy(self) -> f32 {
        match self {
            Shape::Triangle => 1.0 / 3.0,
            _ => 0.0,
        }
    }

    fn from_word(word: &str) -> Option<(Shape, bool)> {
        for &s in Shape::ALL {
            if s.name() == word {
                return Some((s, false));
            }
            if s.plural() == word {
                return Some((s, true));
            }
        }
        None
    }
}

/// Spatial relation of the first group to the second (image coordinates, y down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    /// Every relation.
    pub const ALL: &'static [Relation] = &[Relation::LeftOf, Relation::RightOf, Relation::Above, Relation::Below];

    /// The English phrase ("left of", "above", ...).
    pub fn name(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Does an object centred at `a` stand in this relation to one centred at `b`,
    /// with at least `margin` between the centres along the relation's axis?
    /// Points are (x, y) with y pointing down.
    #[inline]
    pub fn holds(self, a: (f32, f32), b: (f32, f32), margin: f32) -> bool {
        match self {
            Relation::LeftOf => b.0 - a.0 >= margin,
            Relation::RightOf => a.0 - b.0 >= margin,
            Relation::Above => b.1 - a.1 >= margin,
            Relation::Below => a.1 - b.1 >= margin,
        }
    }

    /// True for left/right, false for above/below.
    pub fn is_horizontal(self) -> bool {
        matches!(self, Relation::LeftOf | Relation::RightOf)
    }
}

/// `count` objects of one colour and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub count: usize,
    pub color: Color,
    pub shape: Shape,
}

impl Group {
    fn text(&self) -> String {
        let noun = if self.count == 1 { self.shape.name() } else { self.shape.plural() };
        format!("{} {} {}", NUMBER_WORDS[self.count], self.color.name(), noun)
    }
}

/// What a prompt says: one group ("two red circles") or two groups and a relation
/// ("two red circles left of a blue square"). Total objects 1..=4.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PromptSpec {
    pub groups: Vec<Group>,
    pub relation: Option<Relation>,
}

/// Most objects a prompt may ask for.
pub const MAX_OBJECTS: usize = 4;

/// Canonical number words indexed by count (index 0 unused).
const NUMBER_WORDS: [&str; 5] = ["", "a", "two", "three", "four"];

fn number_from_word(word: &str) -> Option<usize> {
    match word {
        "a" | "one" => Some(1),
        "two" => Some(2),
        "three" => Some(3),
        "four" => Some(4),
        _ => None,
    }
}

impl PromptSpec {
    /// One group, no relation.
    pub fn single(count: usize, color: Color, shape: Shape) -> Self {
        Self { groups: vec![Group { count, color, shape }], relation: None }
    }

    /// Two groups related by `relation`.
    pub fn pair(a: Group, relation: Relation, b: Group) -> Self {
        Self { groups: vec![a, b], relation: Some(relation) }
    }

    /// Canonical English ("a" for one, plural nouns for more).
    pub fn text(&self) -> String {
        let mut s = self.groups.first().map(Group::text).unwrap_or_default();
        if let (Some(rel), Some(b)) = (self.relation, self.groups.get(1)) {
            s.push(' ');
            s.push_str(rel.name());
            s.push(' ');
            s.push_str(&b.text());
        }
        s
    }

    /// Total number of objects.
    pub fn n_objects(&self) -> usize {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Check the structural rules listed in the module docs.
    pub fn validate(&self) -> Result<()> {
        match (self.groups.len(), self.relation) {
            (1, None) | (2, Some(_)) => {}
            (n, r) => bail!("prompt spec: {} group(s) with relation {:?}; need 1 group without a relation or 2 with one", n, r),
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.count == 0 || g.count > MAX_OBJECTS {
                bail!("prompt spec: groups[{i}].count = {} is outside 1..={MAX_OBJECTS}", g.count);
            }
        }
        let n = self.n_objects();
        if n > MAX_OBJECTS {
            bail!("prompt spec '{}': {n} objects in total, at most {MAX_OBJECTS} allowed", self.text());
        }
        if self.groups.len() == 2 && self.groups[0].color == self.groups[1].color && self.groups[0].shape == self.groups[1].shape {
            bail!("prompt spec '{}': both groups are {} {}s, which is ambiguous", self.text(), self.groups[0].color.name(), self.groups[0].shape.name());
        }
        Ok(())
    }

    /// Parse a prompt of the grammar in the module docs (case-insensitive). Errors
    /// name the offending word and what was expected there.
    pub fn parse(text: &str) -> Result<PromptSpec> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.is_empty() {
            bail!("prompt '{text}': empty");
        }
        let mut pos = 0;
        let a = parse_group(text, &words, &mut pos)?;
        let spec = if pos == words.len() {
            PromptSpec { groups: vec![a], relation: None }
        } else {
            let rel = parse_relation(text, &words, &mut pos)?;
            let b = parse_group(text, &words, &mut pos)?;
            if pos < words.len() {
                bail!("prompt '{text}': unexpected word '{}' after the second group (a prompt has at most two groups)", words[pos]);
            }
            PromptSpec { groups: vec![a, b], relation: Some(rel) }
        };
        spec.validate().map_err(|e| anyhow::anyhow!("prompt '{text}': {e}"))?;
        Ok(spec)
    }
}

impl std::fmt::Display for PromptSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::str::FromStr for PromptSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        PromptSpec::parse(s)
    }
}

fn next_word<'a>(text: &str, words: &[&'a str], pos: &mut usize, expected: &str) -> Result<&'a str> {
    match words.get(*pos) {
        Some(w) => {
            *pos += 1;
            Ok(w)
        }
        None => bail!("prompt '{text}': ends early, expected {expected}"),
    }
}

fn parse_group(text: &str, words: &[&str], pos: &mut usize) -> Result<Group> {
    let w = next_word(text, words, pos, "a number word (a, one, two, three, four)")?;
    let Some(count) = number_from_word(w) else {
        bail!("prompt '{text}': expected a number word (a, one, two, three, four), found '{w}'");
    };
    let w = next_word(text, words, pos, "a colour word")?;
    let Some(color) = Color::from_word(w) else {
        let all: Vec<_> = Color::ALL.iter().map(|c| c.name()).collect();
        bail!("prompt '{text}': unknown colour word '{w}' (expected one of {})", all.join(", "));
    };
    let w = next_word(text, words, pos, "a shape word")?;
    let Some((shape, plural)) = Shape::from_word(w) else {
        let all: Vec<_> = Shape::ALL.iter().map(|s| s.name()).collect();
        bail!("prompt '{text}': unknown shape word '{w}' (expected one of {} or their plurals)", all.join(", "));
    };
    if plural != (count > 1) {
        let want = if count > 1 { shape.plural() } else { shape.name() };
        bail!("prompt '{text}': '{w}' does not agree with count {count}; expected '{want}'");
    }
    Ok(Group { count, color, shape })
}

fn parse_relation(text: &str, words: &[&str], pos: &mut usize) -> Result<Relation> {
    let expected = "a relation (left of, right of, above, below)";
    let w = next_word(text, words, pos, expected)?;
    let rel = match w {
        "above" => Relation::Above,
        "below" => Relation::Below,
        "left" | "right" => {
            let of = next_word(text, words, pos, "'of'")?;
            if of != "of" {
                bail!("prompt '{text}': expected 'of' after '{w}', found '{of}'");
            }
            if w == "left" {
                Relation::LeftOf
            } else {
                Relation::RightOf
            }
        }
        _ => bail!("prompt '{text}': expected {expected}, found '{w}'"),
    };
    Ok(rel)
}

/// The longest prompt in tokens: "three red circles left of a blue square" (8).
pub const MAX_TOKENS: usize = 8;

/// The closed vocabulary, "<pad>" at index 0. Token ids are indices into this list;
/// the order is fixed (appending is the only compatible change).
pub fn vocab() -> Vec<&'static str> {
    let mut v = vec!["<pad>", "a", "one", "two", "three", "four"];
    v.extend(Color::ALL.iter().map(|c| c.name()));
    v.extend(Shape::ALL.iter().map(|s| s.name()));
    v.extend(Shape::ALL.iter().map(|s| s.plural()));
    v.extend(["left", "right", "of", "above", "below"]);
    v
}

/// Token ids of `text` (lower-cased, split on whitespace), right-padded with 0 to
/// `max_len`. Errors on an unknown word or a prompt longer than `max_len`.
/// Only the vocabulary is checked here, not the grammar (use [`PromptSpec::parse`]).
pub fn tokenize(text: &str, max_len: usize) -> Result<Vec<u32>> {
    tokenize_in(text, max_len, &vocab(), "ShapeWorld")
}

/// [`tokenize`] over any vocabulary whose id 0 is padding (the video grammar extends the
/// image one); `name` names the vocabulary in errors.
pub fn tokenize_in(text: &str, max_len: usize, voc: &[&str], name: &str) -> Result<Vec<u32>> {
    let lower = text.to_lowercase();
    let mut ids = Vec::with_capacity(max_len);
    for w in lower.split_whitespace() {
        let Some(i) = voc.iter().skip(1).position(|v| *v == w) else {
            bail!("tokenize '{text}': unknown word '{w}' (not in the {name} vocabulary)");
        };
        ids.push((i + 1) as u32);
    }
    if ids.len() > max_len {
        bail!("tokenize '{text}': {} tokens, longer than max_len {max_len}", ids.len());
    }
    ids.resize(max_len, 0);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_examples() {
        let s = PromptSpec::pair(Group { count: 2, color: Color::Red, shape: Shape::Circle }, Relation::LeftOf, Group { count: 1, color: Color::Blue, shape: Shape::Square });
        assert_eq!(s.text(), "two red circles left of a blue square");
        assert_eq!(s.n_objects(), 3);
        assert_eq!(PromptSpec::single(4, Color::Cyan, Shape::Diamond).text(), "four cyan diamonds");
        assert_eq!(PromptSpec::parse("One Yellow Triangle").unwrap(), PromptSpec::single(1, Color::Yellow, Shape::Triangle));
    }

    #[test]
    fn parse_errors_name_the_word() {
        let err = |t: &str| PromptSpec::parse(t).unwrap_err().to_string();
        let e = err("two pink circles");
        assert!(e.contains("'pink'") && e.contains("colour"), "{e}");
        let e = err("a red hexagon");
        assert!(e.contains("'hexagon'") && e.contains("shape"), "{e}");
        let e = err("many red circles");
        assert!(e.contains("'many'") && e.contains("number"), "{e}");
        let e = err("a red circle near a blue square");
        assert!(e.contains("'near'") && e.contains("relation"), "{e}");
        let e = err("a red circle left to a blue square");
        assert!(e.contains("'to'") && e.contains("'of'"), "{e}");
        let e = err("two red circle");
        assert!(e.contains("'circle'") && e.contains("circles"), "{e}");
        let e = err("a red circles");
        assert!(e.contains("'circles'"), "{e}");
        let e = err("a red circle above");
        assert!(e.contains("ends early"), "{e}");
        let e = err("a red circle above a blue square please");
        assert!(e.contains("'please'"), "{e}");
        let e = err("three red circles left of two blue squares");
        assert!(e.contains("5 objects"), "{e}");
        let e = err("a red circle above a red circle");
        assert!(e.contains("ambiguous"), "{e}");
        assert!(err("   ").contains("empty"));
    }

    #[test]
    fn vocab_and_tokenize() {
        let v = vocab();
        assert_eq!(v[0], "<pad>");
        let set: std::collections::HashSet<_> = v.iter().collect();
        assert_eq!(set.len(), v.len(), "duplicate vocabulary word");
        for w in ["a", "one", "four", "circles", "diamonds", "left", "of", "above", "below", "cyan"] {
            assert!(v.contains(&w), "{w} missing");
        }
        let t = tokenize("a red circle", 5).unwrap();
        assert_eq!(t[3..], [0, 0]);
        assert_eq!(v[t[1] as usize], "red");
        let e = tokenize("a red blob", 8).unwrap_err().to_string();
        assert!(e.contains("'blob'"), "{e}");
        let e = tokenize("three red circles left of a blue square", 7).unwrap_err().to_string();
        assert!(e.contains("max_len 7"), "{e}");
        // MAX_TOKENS is the exact maximum over the whole grammar.
        assert_eq!(tokenize("three red circles left of a blue square", MAX_TOKENS).unwrap().len(), MAX_TOKENS);
    }
}
