//! The layering rules of the code map. Between the layers that are crates, the compiler holds
//! them: a crate can only name what its Cargo.toml lists, and [`each_crate_depends_only_on_what_the_code_map_allows`]
//! holds those lists. Inside the `optout` crate (api, server, cli, telemetry), the sources are
//! read: each rule names a folder and what its code may not name. A line counts unless it is a
//! comment, and a `use` declaration counts by the full paths it imports, however its groups are
//! spread over lines; a rule broken fails with the file, the line and the rule.

use std::path::{Path, PathBuf};

/// (crate, dependencies it may not have, why). Normal dependencies only: a crate's tests may
/// compose it with a backend.
const CRATES: &[(&str, &[&str], &str)] = &[
    (
        "optout-core",
        &[
            "optout-proto",
            "optout-store",
            "optout-store-redis",
            "optout-store-embedded",
            "optout-engine",
            "tokio",
            "tonic",
            "prost",
            "redis",
            "redb",
        ],
        "the core is pure: no I/O, no store, no transport",
    ),
    (
        "optout-store",
        &[
            "optout-proto",
            "optout-store-redis",
            "optout-store-embedded",
            "optout-engine",
            "tonic",
            "prost",
            "redis",
            "redb",
            "metrics",
        ],
        "the store contract knows no backend, no check and no transport",
    ),
    (
        "optout-store-redis",
        &[
            "optout-proto",
            "optout-store-embedded",
            "optout-engine",
            "tonic",
            "prost",
            "redb",
            "metrics",
        ],
        "a backend knows only the store contract",
    ),
    (
        "optout-store-embedded",
        &[
            "optout-proto",
            "optout-store-redis",
            "optout-engine",
            "tonic",
            "prost",
            "redis",
            "metrics",
        ],
        "a backend knows only the store contract",
    ),
    (
        "optout-engine",
        &[
            "optout-proto",
            "optout-store-redis",
            "optout-store-embedded",
            "tonic",
            "prost",
            "redis",
            "redb",
            "hyper",
            "tower",
        ],
        "the engine knows no gRPC, and a backend only through the store contract",
    ),
];

#[test]
fn each_crate_depends_only_on_what_the_code_map_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let mut broken = Vec::new();
    for (name, forbidden, why) in CRATES {
        let package = packages
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("{name}: not in the workspace"));
        for dep in package["dependencies"].as_array().expect("dependencies") {
            let normal = dep["kind"].is_null();
            let dep_name = dep["name"].as_str().unwrap_or_default();
            if normal && forbidden.contains(&dep_name) {
                broken.push(format!("{name} depends on {dep_name} ({why})"));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

/// (files under this path, what they may not name, why)
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "src/api",
        &[
            "crate::store",
            "optout_store",
            "crate::cli",
            "crate::server",
        ],
        "the api converts and calls the engine, nothing more",
    ),
    (
        "src/telemetry.rs",
        &[
            "crate::engine",
            "crate::store",
            "crate::api",
            "crate::server",
            "crate::cli",
        ],
        "telemetry is a leaf: nothing it imports reports to it",
    ),
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    for entry in std::fs::read_dir(path).expect("read_dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Whether `what` occurs in `l` as a whole path (not inside a longer name).
fn occurs(l: &str, what: &str) -> bool {
    l.match_indices(what).any(|(i, _)| {
        let before = l[..i].chars().last();
        let after = l[i + what.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// Where `text` names `what` as a path, outside comments: (line number, line). A `use`
/// declaration counts by the full paths it imports, however its groups are spread over lines
/// (`use crate::{\n    store::StoreError,\n};` names `crate::store`), at its first line.
fn named(text: &str, what: &str) -> Vec<(usize, String)> {
    let mut found: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//") && occurs(l, what))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect();
    for (line, path) in use_paths(text) {
        if occurs(&path, what) && !found.iter().any(|(n, _)| *n == line) {
            found.push((line, format!("use {path}")));
        }
    }
    found.sort();
    found
}

/// Each `use` declaration of `text`, with its first line's number, expanded to the full paths it
/// imports: `use crate::{api, store::{A, B}};` gives `crate::api`, `crate::store::A` and
/// `crate::store::B`.
fn use_paths(text: &str) -> Vec<(usize, String)> {
    let code = |l: &str| l.split("//").next().unwrap_or("").to_string();
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, l)) = lines.next() {
        let t = l.trim_start();
        let t = ["pub(crate) ", "pub(super) ", "pub "]
            .iter()
            .find_map(|v| t.strip_prefix(v))
            .unwrap_or(t);
        let Some(rest) = t.strip_prefix("use ") else {
            continue;
        };
        let mut decl = code(rest);
        while !decl.contains(';') {
            match lines.next() {
                Some((_, more)) => decl.push_str(&code(more)),
                None => break,
            }
        }
        let decl: String = decl
            .split(';')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        out.extend(expand(&decl).into_iter().map(|p| (i + 1, p)));
    }
    out
}

/// The paths of one use tree, written without spaces.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let (prefix, inner) = (
        &tree[..open],
        &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())],
    );
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .flat_map(|item| expand(&format!("{prefix}{item}")))
        .collect()
}

#[test]
fn each_layer_names_only_what_the_code_map_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for (under, forbidden, why) in RULES {
        let mut files = Vec::new();
        rust_files(&root.join(under), &mut files);
        assert!(!files.is_empty(), "{under}: no sources found");
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read");
            for what in *forbidden {
                for (line, l) in named(&text, what) {
                    broken.push(format!(
                        "{}:{line}: names {what} ({why}): {}",
                        f.strip_prefix(root).unwrap_or(&f).display(),
                        l.trim()
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

/// The client commands reach the wire types through `cli/client.rs`, not the server's api; only
/// `serve`, which builds the server, may name it.
#[test]
fn the_cli_reaches_the_api_only_through_its_client_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/cli"), &mut files);
    let broken: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("serve.rs"))
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("read");
            named(&text, "crate::api")
                .into_iter()
                .chain(named(&text, "api::proto"))
                .map(move |(line, l)| format!("{}:{line}: {}", f.display(), l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn a_broken_rule_is_found() {
    assert_eq!(
        named(
            "use crate::store::StoreError;\n// crate::store in a comment",
            "crate::store"
        )
        .len(),
        1
    );
    assert!(named("use crate::stores;", "crate::store").is_empty());
    // A name inside a use group spread over lines, nested, is found at the group's first line.
    let grouped = "use crate::{\n    engine::check,\n    store::{\n        // why\n        Lookup,\n    },\n};\n";
    assert_eq!(
        named(grouped, "crate::store"),
        vec![(1, "use crate::store::Lookup".to_string())]
    );
    assert!(named(grouped, "crate::cli").is_empty());
    assert_eq!(
        expand("crate::{api,store::{A,B},cli}"),
        [
            "crate::api",
            "crate::store::A",
            "crate::store::B",
            "crate::cli"
        ]
    );
}
