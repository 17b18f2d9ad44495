//! Keeps the crate's imports one-way: `src/lib.rs`'s crate docs put every top module in a
//! layer, and no file may import a file of another module at its own layer or above, nor join
//! a circle of imports. Standard library only, so it runs without building the crate:
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
//! - `### Layer N: title` (N a positive integer; a larger N is a higher layer) starts a layer.
//! - Each following bullet ``- `name`...``, until the next heading (any `#` line), puts one top
//!   module in that layer: the first backtick-quoted word is its name. Other lines (a bullet's
//!   continuation, prose) are ignored, and so are bullets outside a layer.
//! - A top module is `src/name.rs` with everything under `src/name/`, or `main` for
//!   `src/main.rs`; `lib.rs` is not one. Every top module must be in the map, once, and every
//!   map entry must name a top module.
//!
//! # What counts as an import
//!
//! Any path in the code, not only in `use` lines, braces expanded: `crate::a::b` (and
//! `ringpush::a::b` in `src/main.rs`), `super::x` (`super::super::x`...), `self::x`, and `x::`
//! where the file declares `mod x;`. A path goes to the deepest module file it names
//! (`src/a/b.rs` or `src/a/b/mod.rs`, else `src/a.rs` or `src/a/mod.rs`); paths into `lib.rs`,
//! other crates or the file itself are not edges. `//` comments and string contents are
//! skipped (block comments and raw strings are not recognised), and a file is read up to a
//! `#[cfg(test)]` put on a `mod` (tests may import anything); one put on a single item does not
//! stop the reading. Inline `mod x { ... }` blocks are not tracked: their `super` is the file's.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Imports from one file to another, with every path (as written) that made the edge.
type Edges = BTreeMap<(String, String), BTreeSet<String>>;

/// Every finding on the crate at `root` (the folder holding `src/`), one line each, naming the
/// files and the paths to change: the map's own problems, then circles, then layer breaks.
fn check(root: &Path) -> Vec<String> {
    let (layers, mut findings) = read_map(&read(&root.join("src/lib.rs")));
    let files = source_files(root);
    let modules: BTreeSet<String> = files.iter().map(|file| top_module(file)).collect();
    let unmapped = modules.iter().filter(|m| !layers.contains_key(*m));
    findings.extend(unmapped.map(|m| format!("missing from the map: `{m}` has files in src/")));
    let unknown = layers.keys().filter(|m| !modules.contains(*m));
    findings.extend(unknown.map(|m| format!("the map names `{m}`, which is not a module in src/")));

    let edges = import_edges(root, &files);
    for files in circles(&edges) {
        let inside = edges.iter().filter(|((from, to), _)| files.contains(from) && files.contains(to));
        let edges: Vec<String> =
            inside.map(|((from, to), names)| format!("{from} -> {to} ({})", short(names))).collect();
        findings.push(format!("circle among {}: {}", files.join(", "), edges.join("; ")));
    }
    for ((from, to), names) in &edges {
        let (from_module, to_module) = (top_module(from), top_module(to));
        // A module missing from the map was reported above, not again at each of its imports.
        let (Some(&from_layer), Some(&to_layer)) = (layers.get(&from_module), layers.get(&to_module)) else {
            continue;
        };
        // Files of one module may import each other either way; only circles matter there.
        if from_module != to_module && to_layer >= from_layer {
            let names = names.iter().cloned().collect::<Vec<_>>().join(", ");
            let from = format!("{from} ({from_module}, layer {from_layer})");
            findings.push(format!("layer break: {from} -> {to} ({to_module}, layer {to_layer}): {names}"));
        }
    }
    findings
}

/// The layer of each module the crate docs name, and whatever in the map could not be read.
fn read_map(lib_source: &str) -> (BTreeMap<String, u32>, Vec<String>) {
    let (mut layers, mut findings) = (BTreeMap::new(), Vec::new());
    let mut current: Option<u32> = None;
    for line in lib_source.lines() {
        let Some(doc) = line.trim_start().strip_prefix("//!").map(str::trim) else { continue };
        let mut bad = |why: String| findings.push(format!("map in src/lib.rs: {why}"));
        if let Some(rest) = doc.strip_prefix("### Layer ") {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            current = digits.parse().ok().filter(|n| *n > 0);
            if current.is_none() {
                bad(format!("no positive layer number in `{doc}`"));
            }
        } else if doc.starts_with('#') {
            current = None;
        } else if let (Some(layer), Some(bullet)) = (current, doc.strip_prefix("- ")) {
            let name = bullet.split('`').nth(1).filter(|_| bullet.matches('`').count() >= 2);
            match name.map(|name| (name, layers.insert(name.to_string(), layer))) {
                None => bad(format!("a layer {layer} bullet names no `module`: `{doc}`")),
                Some((name, Some(earlier))) => {
                    bad(format!("`{name}` is in layer {earlier} and in layer {layer}"))
                }
                Some((_, None)) => {}
            }
        }
    }
    (layers, findings)
}

/// Every `.rs` file under `src/` but `lib.rs`, as sorted `/`-separated paths from the root.
fn source_files(root: &Path) -> Vec<String> {
    let (mut found, mut folders) = (Vec::new(), vec![String::from("src")]);
    while let Some(folder) = folders.pop() {
        let listing = fs::read_dir(root.join(&folder));
        for entry in listing.unwrap_or_else(|e| panic!("cannot list {folder} in {}: {e}", root.display())) {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {folder}: {e}"));
            let path = format!("{folder}/{}", entry.file_name().to_string_lossy());
            if entry.path().is_dir() {
                folders.push(path);
            } else if path.ends_with(".rs") && path != "src/lib.rs" {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The module a file defines, from the crate root: `src/a/b.rs` and `src/a/b/mod.rs` are
/// `[a, b]`; `src/main.rs` is `[]`, as it reaches the library from outside.
fn module_path(file: &str) -> Vec<String> {
    let inside = file.strip_prefix("src/").unwrap_or(file);
    let mut parts: Vec<String> = inside.trim_end_matches(".rs").split('/').map(String::from).collect();
    if parts.last().is_some_and(|last| last == "mod") || parts == ["main"] {
        parts.pop();
    }
    parts
}

/// The top module a file belongs to: `src/x.rs` and `src/x/...` are `x`, `src/main.rs` is `main`.
fn top_module(file: &str) -> String {
    module_path(file).into_iter().next().unwrap_or_else(|| "main".to_string())
}

/// Every file-to-file import among `files`, paths that resolve to the importing file left out.
fn import_edges(root: &Path, files: &[String]) -> Edges {
    let known: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    let mut edges = Edges::new();
    for file in files {
        let tokens = tokens(&code_of(&read(&root.join(file))));
        let here = module_path(file);
        let declared = tokens.windows(3).filter(|w| w[0] == "mod" && w[2] == ";" && is_ident(&w[1]));
        let children: BTreeSet<&str> = declared.map(|w| w[1].as_str()).collect();
        let mut i = 0;
        while i < tokens.len() {
            let Some((base, mut pos, written)) = path_start(&tokens, i, file, &here, &children) else {
                i += 1;
                continue;
            };
            for path in use_tree(&tokens, &mut pos) {
                let name = format!("{written}{}", path.join("::")).trim_end_matches("::").to_string();
                let full: Vec<String> = base.iter().cloned().chain(path).collect();
                match resolve(&known, &full, base.len().max(1)) {
                    Some(target) if target != *file => {
                        edges.entry((file.clone(), target)).or_default().insert(name);
                    }
                    _ => {}
                }
            }
            // Go on after the tree, so that the `b` of `crate::{a, b}` is not read as a root.
            i = pos.max(i + 1);
        }
    }
    edges
}

/// When a path into this crate begins at `tokens[i]`: the module it is relative to (from the
/// crate root), where its use-tree starts, and its root as written (`crate::`, `super::`...).
/// `None` for anything else, the tail of a longer path, and `super` above the crate root.
fn path_start(
    tokens: &[String],
    i: usize,
    file: &str,
    here: &[String],
    children: &BTreeSet<&str>,
) -> Option<(Vec<String>, usize, String)> {
    let is_tail = i > 0 && matches!(tokens[i - 1].as_str(), "::" | "$");
    if is_tail || tokens.get(i + 1).is_none_or(|t| t != "::") {
        return None;
    }
    match tokens[i].as_str() {
        "crate" => Some((Vec::new(), i + 2, "crate::".into())),
        "ringpush" if file == "src/main.rs" => Some((Vec::new(), i + 2, "ringpush::".into())),
        "self" => Some((here.to_vec(), i + 2, "self::".into())),
        "super" => {
            let hops = tokens[i..].chunks(2).take_while(|pair| *pair == ["super", "::"]).count();
            let parent = here.get(..here.len().checked_sub(hops)?)?;
            Some((parent.to_vec(), i + 2 * hops, "super::".repeat(hops)))
        }
        child if children.contains(child) => Some((here.to_vec(), i, String::new())),
        _ => None,
    }
}

/// The deepest module file that the path `full` (from the crate root) names, using at least
/// `min` of its segments; `None` when it names none (an item of `lib.rs`, another crate).
fn resolve(known: &BTreeSet<&str>, full: &[String], min: usize) -> Option<String> {
    (min..=full.len()).rev().find_map(|k| {
        let stem = format!("src/{}", full[..k].join("/"));
        [format!("{stem}.rs"), format!("{stem}/mod.rs")].into_iter().find(|c| known.contains(c.as_str()))
    })
}

/// The paths a use-tree spells from `tokens[*pos]`, as segments (`{a::X, b}` gives two; `self`
/// and `*` give the prefix itself), leaving `*pos` just past the tree.
fn use_tree(tokens: &[String], pos: &mut usize) -> Vec<Vec<String>> {
    let peek = |k: usize| tokens.get(k).map_or("", String::as_str);
    let token = peek(*pos);
    if token == "{" {
        let mut paths = Vec::new();
        *pos += 1;
        // Each item is a tree, maybe followed by `as Name`, then `,` or the closing `}`.
        while !matches!(peek(*pos), "}" | "") {
            paths.extend(use_tree(tokens, pos));
            while !matches!(peek(*pos), "," | "}" | "") {
                *pos += 1;
            }
            *pos += usize::from(peek(*pos) == ",");
        }
        *pos += 1;
        return paths;
    }
    if token != "*" && !is_ident(token) {
        return vec![Vec::new()];
    }
    *pos += 1;
    if token == "*" || token == "self" {
        return vec![Vec::new()];
    }
    let next = peek(*pos + 1);
    if peek(*pos) != "::" || !(next == "{" || next == "*" || is_ident(next)) {
        return vec![vec![token.to_string()]];
    }
    *pos += 1;
    let tails = use_tree(tokens, pos);
    tails.into_iter().map(|tail| std::iter::once(token.to_string()).chain(tail).collect()).collect()
}

/// The file's code without comments and string contents (quotes kept), up to its test module.
fn code_of(source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    // A string may span lines; a `//` inside one is text, not a comment.
    let (mut code, mut in_string) = (String::new(), false);
    for (n, line) in lines.iter().enumerate() {
        if !in_string && line.trim() == "#[cfg(test)]" && next_item_is_mod(&lines[n + 1..]) {
            break;
        }
        let chars: Vec<char> = line.chars().collect();
        let at = |j: usize| chars.get(j).copied().unwrap_or('\0');
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            if in_string {
                match c {
                    '\\' => j += 1,
                    '"' => {
                        in_string = false;
                        code.push('"');
                    }
                    _ => {}
                }
            } else if c == '/' && at(j + 1) == '/' {
                break;
            } else if c == '\'' && (at(j + 1) == '\\' || at(j + 2) == '\'') {
                // A char literal such as `'"'` or `'\''`; a lifetime (`'a`) has no closing quote.
                let first_close = if at(j + 1) == '\\' { j + 3 } else { j + 2 };
                j = (first_close..chars.len()).find(|&k| chars[k] == '\'').unwrap_or(j);
            } else {
                in_string = c == '"';
                code.push(c);
            }
            j += 1;
        }
        code.push('\n');
    }
    code
}

/// Whether the item after an attribute line is a module (`mod x`, `pub(crate) mod x`).
fn next_item_is_mod(lines: &[&str]) -> bool {
    let is_item = |line: &&str| !line.is_empty() && !line.starts_with("#[") && !line.starts_with("//");
    let item = lines.iter().map(|line| line.trim()).find(is_item).unwrap_or("");
    item.starts_with("mod ") || (item.starts_with("pub") && item.contains(" mod "))
}

/// Identifiers, `::`, and every other non-space character as a token of its own.
fn tokens(code: &str) -> Vec<String> {
    let mut tokens: Vec<String> = Vec::new();
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if is_ident_char(c) {
            let mut word = String::from(c);
            while let Some(next) = chars.next_if(|&n| is_ident_char(n)) {
                word.push(next);
            }
            tokens.push(word);
        } else if c == ':' && chars.next_if_eq(&':').is_some() {
            tokens.push("::".into());
        } else if !c.is_whitespace() {
            tokens.push(c.to_string());
        }
    }
    tokens
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_ident(token: &str) -> bool {
    token.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Every strongly connected component of more than one file (Kosaraju's algorithm), sorted.
fn circles(edges: &Edges) -> Vec<Vec<String>> {
    let (mut forward, mut backward) = (Graph::new(), Graph::new());
    for (from, to) in edges.keys() {
        forward.entry(from).or_default().push(to);
        backward.entry(to).or_default().push(from);
    }
    let (mut seen, mut finished) = (BTreeSet::new(), Vec::new());
    for file in forward.keys() {
        walk(&forward, file, &mut seen, &mut finished);
    }
    // Walking the reversed edges from the last file finished, each walk is one component.
    let (mut seen, mut found) = (BTreeSet::new(), Vec::new());
    for file in finished.iter().rev() {
        let mut component = Vec::new();
        walk(&backward, file, &mut seen, &mut component);
        if component.len() > 1 {
            component.sort();
            found.push(component.into_iter().map(String::from).collect());
        }
    }
    found.sort();
    found
}

/// Files and the files they import (or, reversed, are imported by).
type Graph<'a> = BTreeMap<&'a str, Vec<&'a str>>;

/// Depth-first from `file` over files not yet `seen`, pushing each to `finished` when done.
fn walk<'a>(graph: &Graph<'a>, file: &'a str, seen: &mut BTreeSet<&'a str>, finished: &mut Vec<&'a str>) {
    if seen.insert(file) {
        for next in graph.get(file).into_iter().flatten() {
            walk(graph, next, seen, finished);
        }
        finished.push(file);
    }
}

/// Up to six names of an edge, then how many more, to keep a finding on one readable line.
fn short(names: &BTreeSet<String>) -> String {
    let shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    let more = names.len() - shown.len();
    shown.join(", ") + &if more > 0 { format!(", and {more} more") } else { String::new() }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The real tree against its own map. Cargo sets `CARGO_MANIFEST_DIR`; built with plain
/// `rustc`, the test runs from the crate's folder instead.
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
            fs::create_dir_all(path.parent().expect("a file has a folder")).expect("create a temp folder");
            fs::write(&path, text).expect("write a temp file");
        }
        tree
    }

    fn edges(&self) -> Vec<String> {
        import_edges(&self.0, &source_files(&self.0))
            .keys()
            .map(|(from, to)| format!("{from} -> {to}"))
            .collect()
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const MAP: &str = "//! # Layout\n//! ### Layer 4: entry\n//! - `main`: the binary.\n\
    //! ### Layer 3: top\n//! - `top`: runs.\n//!   (a bullet's continuation)\n\
    //! ### Layer 2: middle\n//! - `mid`: between.\n//! - `f`: a folder.\n//! - `g`: another.\n\
    //! ### Layer 1: ground\n//! - `low`: imports nothing.\n\
    //! # Thread model\n//! - `notes`: a bullet outside any layer.\npub mod low;\n";

/// A clean tree, a layer each from `main` (4) down: `top` (3), `mid` (2, a folder with a
/// child) and `low` (1); with `f` and `g` (2), folders whose files import each other one way.
/// `replace` adds files or replaces the clean ones.
fn tree_with(replace: &[(&str, &str)]) -> TempTree {
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
    files.retain(|(path, _)| !replace.iter().any(|(new, _)| new == path));
    files.extend_from_slice(replace);
    TempTree::new(&files)
}

#[test]
fn a_clean_layered_tree_has_no_findings() {
    let tree = tree_with(&[]);
    assert_eq!(check(&tree.0), Vec::<String>::new());
    assert!(tree.edges().contains(&"src/main.rs -> src/top.rs".into()), "main reaches the library by name");
}

#[test]
fn a_lower_layer_importing_a_higher_one_is_a_layer_break() {
    let findings = check(&tree_with(&[("src/low.rs", "use crate::top::Thing;\npub struct A;\n")]).0);
    let expected = "layer break: src/low.rs (low, layer 1) -> src/top.rs (top, layer 3): crate::top::Thing";
    assert!(findings.contains(&expected.into()), "{findings:#?}");
}

#[test]
fn files_of_one_folder_importing_each_other_are_a_circle_and_no_layer_break() {
    let findings = check(&tree_with(&[("src/f/a.rs", "use super::b::X;\npub struct Y;\n")]).0);
    let expected = "circle among src/f/a.rs, src/f/b.rs: \
        src/f/a.rs -> src/f/b.rs (super::b::X); src/f/b.rs -> src/f/a.rs (super::a::Y)";
    assert_eq!(findings, vec![expected.to_string()]);
}

#[test]
fn a_grouped_import_gives_an_edge_to_each_module() {
    let edges = tree_with(&[]).edges();
    assert!(edges.contains(&"src/top.rs -> src/low.rs".into()), "{edges:#?}");
    assert!(edges.contains(&"src/top.rs -> src/mid/mod.rs".into()), "{edges:#?}");
}

#[test]
fn modules_missing_from_the_map_and_entries_without_a_module_are_reported() {
    let map = MAP.replace("//! - `low`", "//! - `ghost`: gone.\n//! - `low`");
    let findings = check(&tree_with(&[("src/lib.rs", &map), ("src/extra/mod.rs", "pub struct E;\n")]).0);
    let expected = [
        "missing from the map: `extra` has files in src/",
        "the map names `ghost`, which is not a module in src/",
    ];
    assert_eq!(findings, expected);
}

#[test]
fn comments_strings_and_test_modules_are_not_imports() {
    let low = "// use crate::top::A;\n/// crate::top::B\npub struct A; // crate::top::C\n\
        const S: &str = \"crate::top::D \\\" crate::top::E\";\nconst M: &str = \"\n// not a comment\ncrate::top::F\";\n\
        const Q: char = '\"';\nconst Z: char = '\\'';\n\
        #[cfg(test)]\nfn for_tests() {}\n#[cfg(test)]\nmod tests {\n    use crate::top::G;\n}\n";
    assert_eq!(check(&tree_with(&[("src/low.rs", low)]).0), Vec::<String>::new());
}

#[test]
fn code_after_a_test_only_item_is_still_read() {
    let low = "#[cfg(test)]\nfn for_tests() {}\n\nfn later() -> u8 { crate::mid::C::size() }\n";
    let findings = check(&tree_with(&[("src/low.rs", low)]).0);
    let expected =
        "layer break: src/low.rs (low, layer 1) -> src/mid/mod.rs (mid, layer 2): crate::mid::C::size";
    assert!(findings.contains(&expected.into()), "{findings:#?}");
}

#[test]
fn a_child_using_its_parent_that_re_exports_it_is_a_circle() {
    let tree = tree_with(&[("src/g/child.rs", "use super::Y;\npub struct X;\n")]);
    let edges = tree.edges();
    assert!(edges.contains(&"src/g/mod.rs -> src/g/child.rs".into()), "pub use child::X: {edges:#?}");
    assert!(edges.contains(&"src/g/child.rs -> src/g/mod.rs".into()), "use super::Y: {edges:#?}");
    let findings = check(&tree.0);
    assert!(
        findings.iter().any(|f| f.starts_with("circle among src/g/child.rs, src/g/mod.rs:")),
        "{findings:#?}"
    );
}
