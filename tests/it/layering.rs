//! The layering rules of the code map, held by reading the sources until the crates hold them
//! (issue 29 item 2): each rule names a folder and what its code may not name. A line counts
//! unless it is a comment; a rule broken fails with the file, the line and the rule. Unit-test
//! files (`tests.rs`) compose real backends and are not held to their folder's rule. Line by line,
//! a name inside a multi-line `use` group (`store::{ embedded::... }`) is not seen: the crates will
//! be the complete guard.

use std::path::{Path, PathBuf};

/// (files under this path, what they may not name, why)
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "src/store",
        &[
            "crate::engine",
            "crate::api",
            "crate::server",
            "crate::cli",
            "crate::telemetry",
            "tonic",
        ],
        "stores know nothing of checks, transports or telemetry",
    ),
    (
        "src/engine",
        &[
            "crate::api",
            "crate::server",
            "crate::cli",
            "tonic",
            "prost",
            "optout_proto",
            "store::redis",
            "store::embedded",
        ],
        "the engine knows no gRPC, and a backend only through the store trait",
    ),
    (
        "src/api",
        &["crate::store", "crate::cli", "crate::server"],
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

/// Where `text` names `what` as a path, outside comments: (line number, line).
fn named(text: &str, what: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .filter(|(_, l)| {
            l.match_indices(what).any(|(i, _)| {
                let before = l[..i].chars().last();
                let after = l[i + what.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
        .map(|(i, l)| (i + 1, l.to_string()))
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
        for f in files.into_iter().filter(|f| !f.ends_with("tests.rs")) {
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
}
