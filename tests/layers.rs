//! Keeps the crate's imports one-way: `src/lib.rs`'s crate docs name a layer for every top
//! module, and no file may import a file of a module at its own layer or above, nor join a
//! circle of imports. Standard library only, so it runs without building the crate:
//! `rustc --edition 2021 --test tests/layers.rs -o /tmp/layers && /tmp/layers`.
//!
//! # The map, in `src/lib.rs`'s `//!` lines
//!
//! ```text
//! //! ### Layer 3: what starts the process
//! //! - `main`: the binary.
//! //! - `server`: `run(config, shutdown)`.
//! //! ### Layer 1: no I/O
//! //! - `wheel`: the timer wheel.
//! ```
//!
//! - `### Layer N: title` (N a positive integer, larger is higher) starts a layer.
//! - Each following bullet `- \`name\`...` until the next heading (any `#` line) puts one top
//!   module in that layer: the first backtick-quoted word is its name. Other lines (a bullet's
//!   continuation, prose) are ignored, as are bullets outside a layer.
//! - A top module is `src/name.rs` with everything under `src/name/`, or `main` for
//!   `src/main.rs`; `lib.rs` is not one. Every top module must be in the map, once, and every
//!   map entry must name a top module.
//!
//! # What counts as an import
//!
//! Any path in the code (not only `use` lines), braces expanded: `crate::a::b` (and
//! `ringpush::a::b` in `src/main.rs`), `super::x` (`super::super::x`...), `self::x`, and `x::`
//! where the file declares `mod x;`. A path goes to the deepest module file it names
//! (`src/a/b.rs` or `src/a/b/mod.rs`, else `src/a.rs` or `src/a/mod.rs`); paths into
//! `lib.rs`, other crates or the file itself are not edges. Comments and string contents are
//! skipped, and a file is read only up to a `#[cfg(test)]` that marks a `mod` (tests may import
//! anything); a `#[cfg(test)]` on a single item inside the code does not stop the reading.
//! Inline `mod x { ... }` blocks are not tracked: their `super::` is read as the file's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Imports from one file to another, with every path that made the edge.
type Edges = BTreeMap<(String, String), BTreeSet<String>>;

/// One thing to fix, printed as one line naming the files and paths involved.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    /// A `### Layer` line or bullet the map cannot use.
    BadMap(String),
    /// A top module with files in `src/` that no layer lists.
    MissingFromMap(String),
    /// A map entry with no `src/name.rs`, `src/name/` or `src/main.rs` behind it.
    NoSuchModule(String),
    /// Files that import each other, directly or around a loop; with the edges between them.
    Circle { files: Vec<String>, edges: Vec<String> },
    /// An import that does not point to a strictly lower layer.
    LayerBreak {
        from: String,
        to: String,
        from_layer: (String, u32),
        to_layer: (String, u32),
        names: Vec<String>,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::BadMap(why) => write!(f, "map in src/lib.rs: {why}"),
            Finding::MissingFromMap(name) => write!(f, "missing from the map: `{name}` has files in src/"),
            Finding::NoSuchModule(name) => write!(f, "map names `{name}`, which is not a module in src/"),
            Finding::Circle { files, edges } => {
                write!(f, "circle among {}: {}", files.join(", "), edges.join("; "))
            }
            Finding::LayerBreak { from, to, from_layer, to_layer, names } => write!(
                f,
                "layer break: {from} ({} layer {}) -> {to} ({} layer {}): {}",
                from_layer.0,
                from_layer.1,
                to_layer.0,
                to_layer.1,
                names.join(", ")
            ),
        }
    }
}

/// Runs every check on the crate at `root` (the folder holding `src/`).
fn check(root: &Path) -> Vec<Finding> {
    let lib = read(&root.join("src/lib.rs"));
    let (layers, mut findings) = read_map(&lib);
    let files = source_files(root);
    let modules: BTreeSet<String> = files.iter().map(|file| top_module(file)).collect();
    findings.extend(
        modules.iter().filter(|m| !layers.contains_key(*m)).map(|m| Finding::MissingFromMap(m.clone())),
    );
    findings
        .extend(layers.keys().filter(|m| !modules.contains(*m)).map(|m| Finding::NoSuchModule(m.clone())));

    let edges = import_edges(root, &files);
    for files in circles(&edges) {
        let inside = edges.iter().filter(|((from, to), _)| files.contains(from) && files.contains(to));
        let edges = inside.map(|((from, to), names)| format!("{from} -> {to} ({})", short(names))).collect();
        findings.push(Finding::Circle { files, edges });
    }
    for ((from, to), names) in &edges {
        let (from_module, to_module) = (top_module(from), top_module(to));
        if from_module == to_module {
            continue;
        }
        if let (Some(&from_n), Some(&to_n)) = (layers.get(&from_module), layers.get(&to_module)) {
            if to_n >= from_n {
                findings.push(Finding::LayerBreak {
                    from: from.clone(),
                    to: to.clone(),
                    from_layer: (from_module, from_n),
                    to_layer: (to_module, to_n),
                    names: names.iter().cloned().collect(),
                });
            }
        }
    }
    findings
}

/// The layer of each module named in the crate docs, and whatever in the map could not be read.
fn read_map(lib_source: &str) -> (BTreeMap<String, u32>, Vec<Finding>) {
    let (mut layers, mut findings) = (BTreeMap::new(), Vec::new());
    let mut current: Option<u32> = None;
    for line in lib_source.lines() {
        let Some(doc) = line.trim_start().strip_prefix("//!") else { continue };
        let doc = doc.trim();
        if let Some(rest) = doc.strip_prefix("### Layer ") {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            current = digits.parse().ok().filter(|n| *n > 0);
            if current.is_none() {
                findings.push(Finding::BadMap(format!("no positive layer number in `{doc}`")));
            }
        } else if doc.starts_with('#') {
            current = None;
        } else if let (Some(layer), Some(bullet)) = (current, doc.strip_prefix("- ")) {
            let Some(name) = bullet.split('`').nth(1).filter(|_| bullet.matches('`').count() >= 2) else {
                findings.push(Finding::BadMap(format!("layer {layer} bullet without a `module`: `{doc}`")));
                continue;
            };
            if let Some(earlier) = layers.insert(name.to_string(), layer) {
                findings.push(Finding::BadMap(format!("`{name}` is in layer {earlier} and layer {layer}")));
            }
        }
    }
    (layers, findings)
}

/// Every `.rs` file under `src/` but `lib.rs`, as sorted `/`-separated paths from the root.
fn source_files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut folders = vec![PathBuf::from("src")];
    while let Some(folder) = folders.pop() {
        let entries = fs::read_dir(root.join(&folder))
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.join(&folder).display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", folder.display()));
            let relative = folder.join(entry.file_name());
            if entry.path().is_dir() {
                folders.push(relative);
            } else if relative.extension().is_some_and(|ext| ext == "rs") {
                let parts: Vec<String> =
                    relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                found.push(parts.join("/"));
            }
        }
    }
    found.retain(|file| file != "src/lib.rs");
    found.sort();
    found
}

/// The top module a file belongs to: `src/x.rs` and `src/x/...` are `x`, `src/main.rs` is `main`.
fn top_module(file: &str) -> String {
    let inside = file.strip_prefix("src/").unwrap_or(file);
    let first = inside.split('/').next().unwrap_or(inside);
    first.strip_suffix(".rs").unwrap_or(first).to_string()
}

/// The module path a file defines: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`; `main.rs` is `[]`.
fn module_path(file: &str) -> Vec<String> {
    let inside = file.strip_prefix("src/").unwrap_or(file);
    let mut parts: Vec<String> =
        inside.strip_suffix(".rs").unwrap_or(inside).split('/').map(String::from).collect();
    if parts.last().is_some_and(|last| last == "mod") || parts == ["main"] {
        parts.pop();
    }
    parts
}

/// Every file-to-file import of `files`, paths that resolve to the importing file left out.
fn import_edges(root: &Path, files: &[String]) -> Edges {
    let known: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    let mut edges = Edges::new();
    for file in files {
        let tokens = tokens(&code_of(&read(&root.join(file))));
        let here = module_path(file);
        let children: BTreeSet<&str> = tokens
            .windows(3)
            .filter(|w| w[0] == "mod" && w[2] == ";" && is_ident(&w[1]))
            .map(|w| w[1].as_str())
            .collect();
        let mut i = 0;
        while i + 1 < tokens.len() {
            let word = tokens[i].as_str();
            let is_root = tokens[i + 1] == "::" && (i == 0 || !matches!(tokens[i - 1].as_str(), "::" | "$"));
            // Where the written path starts, in segments from the crate root, and how it is spelled.
            let (base, mut pos, written) = match word {
                _ if !is_root => (None, i + 1, String::new()),
                "crate" => (Some(Vec::new()), i + 2, "crate::".to_string()),
                "ringpush" if file == "src/main.rs" => (Some(Vec::new()), i + 2, "ringpush::".to_string()),
                "self" => (Some(here.clone()), i + 2, "self::".to_string()),
                "super" => {
                    let (mut up, mut at) = (0, i);
                    while tokens.get(at).is_some_and(|t| t == "super")
                        && tokens.get(at + 1).is_some_and(|t| t == "::")
                    {
                        (up, at) = (up + 1, at + 2);
                    }
                    let base = (up <= here.len()).then(|| here[..here.len() - up].to_vec());
                    (base, at, "super::".repeat(up))
                }
                _ if children.contains(word) => (Some(here.clone()), i, String::new()),
                _ => (None, i + 1, String::new()),
            };
            let Some(base) = base else {
                i = pos;
                continue;
            };
            for path in use_tree(&tokens, &mut pos) {
                let spelled = format!("{written}{}", path.join("::"));
                let full: Vec<String> = base.iter().cloned().chain(path).collect();
                if let Some(target) = resolve(&known, &full, base.len().max(1)) {
                    if target != *file {
                        edges
                            .entry((file.clone(), target))
                            .or_default()
                            .insert(spelled.trim_end_matches("::").to_string());
                    }
                }
            }
            i = pos.max(i + 1);
        }
    }
    edges
}

/// The deepest module file a path from the crate root names, using at least `min` segments.
fn resolve(known: &BTreeSet<&str>, full: &[String], min: usize) -> Option<String> {
    (min..=full.len()).rev().find_map(|k| {
        let stem = format!("src/{}", full[..k].join("/"));
        [format!("{stem}.rs"), format!("{stem}/mod.rs")].into_iter().find(|c| known.contains(c.as_str()))
    })
}

/// The paths a use-tree spells from `tokens[*pos]`, as segments (`{a::X, b}` gives two; `self`
/// and `*` give the prefix itself), leaving `*pos` just past the tree.
fn use_tree(tokens: &[String], pos: &mut usize) -> Vec<Vec<String>> {
    let Some(token) = tokens.get(*pos) else { return vec![Vec::new()] };
    if token == "{" {
        *pos += 1;
        let mut paths = Vec::new();
        while let Some(token) = tokens.get(*pos) {
            match token.as_str() {
                "}" => {
                    *pos += 1;
                    break;
                }
                "," => *pos += 1,
                _ => {
                    paths.extend(use_tree(tokens, pos));
                    // Skip what follows the tree in its group, such as `as Name`.
                    while tokens.get(*pos).is_some_and(|t| t != "," && t != "}") {
                        *pos += 1;
                    }
                }
            }
        }
        return paths;
    }
    if token == "*" || token == "self" {
        *pos += 1;
        return vec![Vec::new()];
    }
    if !is_ident(token) {
        return vec![Vec::new()];
    }
    *pos += 1;
    let more = tokens.get(*pos).is_some_and(|t| t == "::")
        && tokens.get(*pos + 1).is_some_and(|t| t == "{" || t == "*" || is_ident(t));
    if !more {
        return vec![vec![token.clone()]];
    }
    *pos += 1;
    let tails = use_tree(tokens, pos);
    tails.into_iter().map(|tail| std::iter::once(token.clone()).chain(tail).collect()).collect()
}

/// What the scanner is inside of; strings and block comments may span lines.
#[derive(Clone, Copy, PartialEq)]
enum Within {
    Code,
    Str,
    RawStr(usize),
    BlockComment(usize),
}

/// The file's code without comments and string contents (quotes kept), up to its test module.
fn code_of(source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let (mut out, mut within) = (String::new(), Within::Code);
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if within == Within::Code && trimmed.starts_with("//") {
            continue;
        }
        if within == Within::Code && trimmed == "#[cfg(test)]" && next_item_is_mod(&lines[n + 1..]) {
            break;
        }
        let chars: Vec<char> = line.chars().collect();
        let at = |j: usize| chars.get(j).copied().unwrap_or('\0');
        let mut j = 0;
        while j < chars.len() {
            let (c, next) = (chars[j], at(j + 1));
            match within {
                Within::Str if c == '\\' => j += 1,
                Within::Str if c == '"' => (within, out) = (Within::Code, out + "\""),
                Within::RawStr(hashes) if c == '"' && (1..=hashes).all(|h| at(j + h) == '#') => {
                    (within, out, j) = (Within::Code, out + "\"", j + hashes);
                }
                Within::BlockComment(depth) if c == '*' && next == '/' => {
                    within = if depth == 1 { Within::Code } else { Within::BlockComment(depth - 1) };
                    j += 1;
                }
                Within::BlockComment(depth) if c == '/' && next == '*' => {
                    (within, j) = (Within::BlockComment(depth + 1), j + 1)
                }
                Within::Code if c == '/' && next == '/' => break,
                Within::Code if c == '/' && next == '*' => (within, j) = (Within::BlockComment(1), j + 1),
                Within::Code if c == '"' => (within, out) = (Within::Str, out + "\""),
                Within::Code if c == 'r' && (j == 0 || !is_ident_char(at(j - 1)) || at(j - 1) == 'b') => {
                    let hashes = chars[j + 1..].iter().take_while(|&&h| h == '#').count();
                    if at(j + 1 + hashes) == '"' {
                        (within, out, j) = (Within::RawStr(hashes), out + "\"", j + 1 + hashes);
                    } else {
                        out.push(c);
                    }
                }
                // A char literal: `'"'` or `'\''`; a lifetime (`'a`) has no closing quote.
                Within::Code if c == '\'' && next == '\\' => {
                    j = (j + 3..chars.len()).find(|&k| chars[k] == '\'').unwrap_or(j);
                }
                Within::Code if c == '\'' && at(j + 2) == '\'' => j += 2,
                Within::Code => out.push(c),
                _ => {}
            }
            j += 1;
        }
        out.push('\n');
    }
    out
}

/// Whether the next item after an attribute line is a module (`mod x`, `pub(crate) mod x`).
fn next_item_is_mod(lines: &[&str]) -> bool {
    let mut items = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with("#[") && !l.starts_with("//"));
    items
        .next()
        .is_some_and(|item| item.starts_with("mod ") || (item.starts_with("pub") && item.contains(" mod ")))
}

/// Identifiers, `::`, and every other non-space character as a token of its own.
fn tokens(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let (mut tokens, mut j) = (Vec::new(), 0);
    while j < chars.len() {
        let c = chars[j];
        if is_ident_char(c) {
            let start = j;
            while j < chars.len() && is_ident_char(chars[j]) {
                j += 1;
            }
            tokens.push(chars[start..j].iter().collect());
            continue;
        }
        if c == ':' && chars.get(j + 1) == Some(&':') {
            tokens.push("::".to_string());
            j += 1;
        } else if !c.is_whitespace() {
            tokens.push(c.to_string());
        }
        j += 1;
    }
    tokens
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_ident(token: &str) -> bool {
    token.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Every strongly connected component of more than one file (Tarjan), each sorted.
fn circles(edges: &Edges) -> Vec<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
        next.entry(to).or_default();
    }
    /// Tarjan's bookkeeping: visit order, lowest order reachable, and the stack of open files.
    struct Walk<'a> {
        next: BTreeMap<&'a str, Vec<&'a str>>,
        order: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(walk: &mut Walk<'a>, file: &'a str) {
        let n = walk.order.len();
        walk.order.insert(file, n);
        walk.low.insert(file, n);
        walk.stack.push(file);
        for to in walk.next[file].clone() {
            if !walk.order.contains_key(to) {
                visit(walk, to);
                let low = walk.low[file].min(walk.low[to]);
                walk.low.insert(file, low);
            } else if walk.stack.contains(&to) {
                let low = walk.low[file].min(walk.order[to]);
                walk.low.insert(file, low);
            }
        }
        if walk.low[file] == walk.order[file] {
            let at = walk.stack.iter().rposition(|f| *f == file).unwrap_or(0);
            let mut component: Vec<String> = walk.stack.drain(at..).map(String::from).collect();
            if component.len() > 1 {
                component.sort();
                walk.found.push(component);
            }
        }
    }
    let files: Vec<&str> = next.keys().copied().collect();
    let mut walk =
        Walk { next, order: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), found: Vec::new() };
    for file in files {
        if !walk.order.contains_key(file) {
            visit(&mut walk, file);
        }
    }
    walk.found.sort();
    walk.found
}

/// Up to six names of an edge, then how many more, to keep a finding on one readable line.
fn short(names: &BTreeSet<String>) -> String {
    let shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    shown.join(", ") + &if more > 0 { format!(", and {more} more") } else { String::new() }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn the_crate_keeps_its_layers() {
    let root = PathBuf::from(option_env!("CARGO_MANIFEST_DIR").unwrap_or("."));
    let findings = check(&root);
    let lines: Vec<String> = findings.iter().map(|f| format!("  {f}")).collect();
    assert!(findings.is_empty(), "{} findings in {}:\n{}", findings.len(), root.display(), lines.join("\n"));
}

/// A crate tree in a fresh temporary folder, removed when dropped (even when a test fails).
struct TempTree(PathBuf);

impl TempTree {
    fn new(files: &[(&str, &str)]) -> TempTree {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let name =
            format!("ringpush-layers-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed));
        let tree = TempTree(std::env::temp_dir().join(name));
        for (path, text) in files {
            let path = tree.0.join(path);
            fs::create_dir_all(path.parent().expect("file has a folder")).expect("create temp folder");
            fs::write(&path, text).expect("write temp file");
        }
        tree
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const MAP: &str = "//! # Layout\n//! ### Layer 4: entry\n//! - `main`: the binary.\n//! ### Layer 3: top\n//! - `top`: runs.\n\
    //!   (a continuation line)\n//! ### Layer 2: middle\n//! - `mid`: between.\n//! - `f`: a folder.\n\
    //! - `g`: another.\n//! ### Layer 1: ground\n//! - `low`: no imports.\n//! # Thread model\n\
    //! - `notes`: a bullet outside any layer.\npub mod low;\n";

/// A clean tree, one layer each from `main` (4) down: `top` (3), `mid` (2, a folder with a
/// child) and `low` (1), plus the folders `f` and `g` whose files import each other one way.
fn clean_tree(replace: &[(&str, &str)]) -> TempTree {
    let mut files = vec![
        ("src/lib.rs", MAP),
        ("src/main.rs", "use ringpush::top::run;\nfn main() { run() }\n"),
        ("src/top.rs", "use crate::{low::A, mid::{B, C}};\npub fn run() {}\n"),
        ("src/mid/mod.rs", "mod inner;\npub use inner::B;\npub struct C(crate::low::A);\n"),
        ("src/mid/inner.rs", "pub struct B;\n"),
        ("src/low.rs", "pub struct A;\n"),
        ("src/f/mod.rs", "mod a;\nmod b;\n"),
        ("src/f/a.rs", "pub struct Y;\n"),
        ("src/f/b.rs", "pub struct X(super::a::Y);\n"),
        ("src/g/mod.rs", "mod child;\npub use child::X;\npub struct Y;\n"),
        ("src/g/child.rs", "pub struct X;\n"),
    ];
    for (path, text) in replace {
        files.retain(|(p, _)| p != path);
        files.push((path, text));
    }
    TempTree::new(&files)
}

fn edges_of(tree: &TempTree) -> Vec<(String, String)> {
    import_edges(&tree.0, &source_files(&tree.0)).into_keys().collect()
}

fn edge(from: &str, to: &str) -> (String, String) {
    (from.to_string(), to.to_string())
}

#[test]
fn a_clean_layered_tree_has_no_findings() {
    let tree = clean_tree(&[]);
    assert_eq!(check(&tree.0), vec![]);
    assert!(edges_of(&tree).contains(&edge("src/main.rs", "src/top.rs")), "main reaches the lib by name");
}

#[test]
fn a_lower_layer_importing_a_higher_one_is_a_layer_break() {
    let tree = clean_tree(&[("src/low.rs", "use crate::top::Thing;\npub struct A;\n")]);
    let findings = check(&tree.0);
    let broken = findings.iter().any(|f| {
        matches!(f, Finding::LayerBreak { from, to, names, .. }
            if from == "src/low.rs" && to == "src/top.rs" && names == &["crate::top::Thing"])
    });
    assert!(broken, "{findings:#?}");
    let line = findings.iter().map(ToString::to_string).find(|l| l.starts_with("layer break"));
    assert_eq!(
        line.as_deref(),
        Some("layer break: src/low.rs (low layer 1) -> src/top.rs (top layer 3): crate::top::Thing")
    );
}

#[test]
fn files_of_one_folder_importing_each_other_are_a_circle() {
    let tree = clean_tree(&[("src/f/a.rs", "use super::b::X;\npub struct Y;\n")]);
    let findings = check(&tree.0);
    let circle = vec!["src/f/a.rs".to_string(), "src/f/b.rs".to_string()];
    assert!(
        findings.iter().any(|f| matches!(f, Finding::Circle { files, .. } if *files == circle)),
        "{findings:#?}"
    );
    assert_eq!(findings.len(), 1, "a circle inside one module is no layer break: {findings:#?}");
}

#[test]
fn a_grouped_import_gives_an_edge_to_each_module() {
    let edges = edges_of(&clean_tree(&[]));
    assert!(edges.contains(&edge("src/top.rs", "src/low.rs")), "{edges:?}");
    assert!(edges.contains(&edge("src/top.rs", "src/mid/mod.rs")), "{edges:?}");
}

#[test]
fn modules_missing_from_the_map_and_entries_without_a_module_are_reported() {
    let map = MAP.replace("//! - `low`", "//! - `ghost`: gone.\n//! - `low`");
    let tree = clean_tree(&[("src/lib.rs", &map), ("src/extra/mod.rs", "pub struct E;\n")]);
    let findings = check(&tree.0);
    assert_eq!(
        findings,
        vec![Finding::MissingFromMap("extra".into()), Finding::NoSuchModule("ghost".into())]
    );
}

#[test]
fn comments_strings_and_test_modules_are_not_imports() {
    let low = "// use crate::top::A;\n/// crate::top::B\npub struct A; // crate::top::C\n\
        /* crate::top::D\n   crate::top::E */\nconst S: &str = \"crate::top::F\";\nconst R: &str = r#\"\"crate::top::G\"#;\n\
        const Q: char = '\"';\n#[cfg(test)]\nfn for_tests() {}\n#[cfg(test)]\nmod tests {\n    use crate::top::H;\n}\n";
    let tree = clean_tree(&[("src/low.rs", low)]);
    assert_eq!(check(&tree.0), vec![]);
}

#[test]
fn code_after_a_test_only_item_is_still_read() {
    let low = "#[cfg(test)]\nfn for_tests() {}\n\nfn later() { crate::mid::C::default(); }\n";
    let findings = check(&clean_tree(&[("src/low.rs", low)]).0);
    assert!(
        findings.iter().any(|f| matches!(f, Finding::LayerBreak { to, .. } if to == "src/mid/mod.rs")),
        "{findings:#?}"
    );
}

#[test]
fn a_child_using_its_parent_that_re_exports_it_is_a_circle() {
    let tree = clean_tree(&[("src/g/child.rs", "use super::Y;\npub struct X;\n")]);
    let edges = edges_of(&tree);
    assert!(edges.contains(&edge("src/g/mod.rs", "src/g/child.rs")), "pub use child::X: {edges:?}");
    assert!(edges.contains(&edge("src/g/child.rs", "src/g/mod.rs")), "use super::Y: {edges:?}");
    let circle = vec!["src/g/child.rs".to_string(), "src/g/mod.rs".to_string()];
    let findings = check(&tree.0);
    assert!(
        findings.iter().any(|f| matches!(f, Finding::Circle { files, .. } if *files == circle)),
        "{findings:#?}"
    );
}
