//! The layering check: no import cycle in `src/`, tests included. Nodes are the source
//! files (each a module); an edge is a path into another module (`crate::…`, `super::…`,
//! `self::…`, or a child module named in its parent). Edges between a module and its own
//! descendants are left out (a `mod.rs` holding the traits its children implement is one
//! unit), so what must be acyclic is every other pair of files, and the top-level modules
//! (the layers) on their own. A cycle fails naming the files and one path of each edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path of a file under `src/` ("policy/sd3/mod.rs" → ["policy", "sd3"]).
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel.trim_end_matches(".rs").split('/').map(str::to_string).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&p).unwrap()));
        }
    }
}

/// The source with comments, string and char literals blanked (same length, newlines
/// kept), so neither paths in prose nor braces in format strings are read as code.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let end = src[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) {
            // Raw string r"…" / r#"…"#.
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let start = i + 2 + hashes;
            let end = b[start..].windows(close.len()).position(|w| w == close.as_slice()).map_or(b.len(), |p| start + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, (j + 1).min(b.len()));
            i = j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'); a lifetime ('a) is left alone.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|&c| c == b'\'').map(|p| i + 2 + p + 1)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(e) => {
                    blank(&mut out, i, e);
                    i = e;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Paths in `code`, each with the byte offset it starts at: `a::b::c`, and for a use
/// group `a::{b, c::{d, e}}` one path per leaf (`a::b`, `a::c::d`, `a::c::e`).
fn paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if is_ident(b[i]) && (i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b':')) && !b[i].is_ascii_digit() {
            let start = i;
            let (segs, end) = read_path(b, i);
            if segs.len() > 1 || b[end..].starts_with(b"::{") {
                expand(b, start, segs, end, &mut out);
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// `ident(::ident)*` from `i`: the segments and the offset after them.
fn read_path(b: &[u8], mut i: usize) -> (Vec<String>, usize) {
    let mut segs = Vec::new();
    loop {
        let s = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        if s == i {
            break;
        }
        segs.push(String::from_utf8_lossy(&b[s..i]).into_owned());
        if b[i..].starts_with(b"::") && b.get(i + 2).is_some_and(|&c| is_ident(c)) {
            i += 2;
        } else {
            break;
        }
    }
    (segs, i)
}

fn expand(b: &[u8], start: usize, base: Vec<String>, end: usize, out: &mut Vec<(usize, Vec<String>)>) {
    if !b[end..].starts_with(b"::{") {
        out.push((start, base));
        return;
    }
    // A group: split at top-level commas.
    let mut i = end + 3;
    let mut depth = 0;
    let mut item = i;
    let mut items = Vec::new();
    while i < b.len() {
        match b[i] {
            b'{' => depth += 1,
            b'}' if depth == 0 => {
                items.push((item, i));
                break;
            }
            b'}' => depth -= 1,
            b',' if depth == 0 => {
                items.push((item, i));
                item = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    for (s, e) in items {
        let mut j = s;
        while j < e && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if j >= e || !is_ident(b[j]) {
            continue; // `*` or empty
        }
        let (segs, after) = read_path(&b[..e], j);
        let mut full = base.clone();
        full.extend(segs);
        expand(b, start, full, after, out);
    }
}

/// The inline `mod name {` blocks enclosing each offset: (open, close) ranges.
fn inline_mods(code: &str) -> Vec<(usize, usize)> {
    let b = code.as_bytes();
    let mut stack: Vec<(usize, bool)> = Vec::new(); // (open offset, is an inline mod)
    let mut out = Vec::new();
    let mut pending_mod = false;
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"mod ") && (i == 0 || !is_ident(b[i - 1])) {
            let (_, after) = read_path(b, i + 4);
            let mut j = after;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            pending_mod = b.get(j) == Some(&b'{');
            i = j;
            continue;
        }
        match b[i] {
            b'{' => {
                stack.push((i, pending_mod));
                pending_mod = false;
            }
            b'}' => {
                if let Some((open, true)) = stack.pop() {
                    out.push((open, i));
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

struct Graph {
    /// file → (file it reaches, one path that does)
    edges: BTreeMap<String, BTreeMap<String, String>>,
    files: BTreeMap<Vec<String>, String>,
}

fn build() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut srcs = Vec::new();
    rust_files(&root, &root, &mut srcs);
    let files: BTreeMap<Vec<String>, String> = srcs.iter().map(|(rel, _)| (module_of(rel), rel.clone())).collect();
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (rel, src) in &srcs {
        let me = module_of(rel);
        let code = code_only(src);
        let mods = inline_mods(&code);
        // Child modules declared here (`mod x;`), which a bare `x::…` path names.
        let children: BTreeSet<String> = files.keys().filter(|m| m.len() == me.len() + 1 && m.starts_with(&me)).map(|m| m.last().unwrap().clone()).collect();
        for (at, segs) in paths(&code) {
            let inline_depth = mods.iter().filter(|(o, c)| *o < at && at < *c).count();
            let mut abs: Vec<String> = match segs[0].as_str() {
                "crate" => segs[1..].to_vec(),
                "super" | "self" => {
                    // Inside `mod tests { … }` the first `super` is the file's own module.
                    let mut base = me.clone();
                    let mut k = 0;
                    let mut depth = inline_depth;
                    while k < segs.len() && (segs[k] == "super" || segs[k] == "self") {
                        if segs[k] == "super" {
                            if depth > 0 {
                                depth -= 1;
                            } else {
                                base.pop();
                            }
                        }
                        k += 1;
                    }
                    base.extend(segs[k..].iter().cloned());
                    base
                }
                first if inline_depth == 0 && children.contains(first) => me.iter().cloned().chain(segs.iter().cloned()).collect(),
                _ => continue,
            };
            // The longest prefix that is a file module.
            while !abs.is_empty() && !files.contains_key(&abs) {
                abs.pop();
            }
            let Some(target) = files.get(&abs) else { continue };
            let tm = module_of(target);
            // Not to itself, nor between a module and its own descendants.
            if tm.starts_with(&me) || me.starts_with(&tm) {
                continue;
            }
            edges.entry(rel.clone()).or_default().entry(target.clone()).or_insert_with(|| format!("{}:{}", rel, 1 + code[..at].matches('\n').count()));
        }
    }
    Graph { edges, files }
}

/// Strongly connected components of more than one node (Tarjan).
fn cycles(nodes: &BTreeSet<String>, next: &dyn Fn(&str) -> Vec<String>) -> Vec<Vec<String>> {
    struct S<'a> {
        next: &'a dyn Fn(&str) -> Vec<String>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        out: Vec<Vec<String>>,
    }
    fn visit(s: &mut S, v: &str) {
        let i = s.index.len();
        s.index.insert(v.into(), i);
        s.low.insert(v.into(), i);
        s.stack.push(v.into());
        s.on.insert(v.into());
        for w in (s.next)(v) {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let lw = s.low[&w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(&w);
                let done = w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = S { next, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for n in nodes {
        if !s.index.contains_key(n) {
            visit(&mut s, n);
        }
    }
    s.out
}

fn describe(comps: &[Vec<String>], via: &dyn Fn(&str, &str) -> Option<String>) -> String {
    let mut o = String::new();
    for c in comps {
        o.push_str(&format!("cycle through {}:\n", c.join(", ")));
        for a in c {
            for b in c {
                if let Some(p) = via(a, b) {
                    o.push_str(&format!("  {a} -> {b}  ({p})\n"));
                }
            }
        }
    }
    o
}

#[test]
fn no_import_cycle_between_files() {
    let g = build();
    let nodes: BTreeSet<String> = g.files.values().cloned().collect();
    let next = |v: &str| g.edges.get(v).map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let comps = cycles(&nodes, &next);
    let via = |a: &str, b: &str| g.edges.get(a).and_then(|m| m.get(b)).cloned();
    assert!(comps.is_empty(), "{}", describe(&comps, &via));
}

#[test]
fn no_import_cycle_between_layers() {
    let g = build();
    let top = |f: &str| module_of(f).first().cloned().unwrap_or_else(|| "lib".into());
    let mut up: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (a, m) in &g.edges {
        for (b, p) in m {
            if top(a) != top(b) {
                up.entry(top(a)).or_default().entry(top(b)).or_insert_with(|| p.clone());
            }
        }
    }
    let nodes: BTreeSet<String> = g.files.values().map(|f| top(f)).collect();
    let next = |v: &str| up.get(v).map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let comps = cycles(&nodes, &next);
    let via = |a: &str, b: &str| up.get(a).and_then(|m| m.get(b)).cloned();
    assert!(comps.is_empty(), "{}", describe(&comps, &via));
}

/// The checker itself: paths, groups, `super` inside `mod tests`, child modules, and
/// what comments and strings hide.
#[test]
fn the_checker_reads_paths_as_rustc_does() {
    let code = code_only("use crate::a::{b, c::{d, e}};\n// crate::x::y\nlet s = \"crate::q::r {\"; let c = '{';\nmod tests { use super::z::w; }\n");
    let p: Vec<Vec<String>> = paths(&code).into_iter().map(|(_, s)| s).collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(p.contains(&s(&["crate", "a", "b"])) && p.contains(&s(&["crate", "a", "c", "d"])) && p.contains(&s(&["crate", "a", "c", "e"])), "{p:?}");
    assert!(!p.iter().any(|x| x.contains(&"x".to_string()) || x.contains(&"q".to_string())), "comments and strings are not code: {p:?}");
    let mods = inline_mods(&code);
    assert_eq!(mods.len(), 1, "one inline mod, the braces in the string and char ignored");
    let at = code.find("super::z").unwrap();
    assert!(mods[0].0 < at && at < mods[0].1);
    // And the real tree has edges to check (a checker that reads nothing passes vacuously).
    let g = build();
    assert!(g.edges.values().map(|m| m.len()).sum::<usize>() > 100, "too few import edges found: the parser is broken");
    assert!(g.edges.get("train/grpo.rs").is_some_and(|m| m.contains_key("objective.rs")), "train/grpo.rs uses crate::objective");
}
