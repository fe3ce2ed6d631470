#![allow(clippy::unwrap_used)]
//! Fuzz targets of the config loader (proptest): mutated copies of the shipped configs, YAML
//! edits at the level of lines and values, arbitrary text, and arbitrary `--set` overrides.
//! Property: loading never panics; it returns a config that survives a round trip through
//! `to_yaml`, or a typed error with a message. `SEPDIST_FUZZ_SECS=60` fuzzes each target for a
//! minute (see tests/fuzzing/mod.rs).

mod fuzzing;

use fuzzing::{Endian, apply, fuzz, mutations};
use proptest::prelude::*;
use proptest::sample::Index;
use sepdist_config::{Config, ConfigSource, load_file, load_str};
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};

/// The configs shipped in configs/ and the test fixture, as (name, text).
fn bases() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.push(root.join("tests/fixtures/tiny.yaml"));
    files.sort();
    files
        .iter()
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(p).unwrap(),
            )
        })
        .collect()
}

/// Every dotted key of the schema (sections and leaves), from the default config.
fn schema_keys() -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Mapping(m) = v {
            for (k, sub) in m {
                let Some(k) = k.as_str() else { continue };
                let key = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(key.clone());
                walk(sub, &key, out);
            }
        }
    }
    let tree: Value = serde_yaml_ng::from_str(&Config::default().to_yaml()).unwrap();
    let mut out = Vec::new();
    walk(&tree, "", &mut out);
    out
}

/// YAML values that stress typing and arithmetic: out-of-range and negative numbers, special
/// floats, wrong kinds, aliases, tags, deep nesting, empty things.
const TOKENS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "1e308",
    "1e400",
    "-1e400",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "-9223372036854775809",
    "0.5",
    "-0.0",
    ".nan",
    ".inf",
    "-.inf",
    "1_000",
    "0x10",
    "0o17",
    "true",
    "false",
    "null",
    "~",
    "\"\"",
    "''",
    "[]",
    "{}",
    "[0]",
    "[0, 0]",
    "[1, 2, 3]",
    "[18446744073709551615, 18446744073709551615]",
    "[9223372036854775807, 9223372036854775807, 2]",
    "[.nan, .inf]",
    "[[1]]",
    "{a: 1}",
    "bs_roformer_62",
    "synthetic",
    "musdb18hq",
    "auto",
    "none",
    "mpi",
    "nccl",
    "/dev/null",
    "/nonexistent/dir",
    "\"\\0\"",
    "!!binary aGVsbG8=",
    "!!str 1",
    "!!int x",
    "!custom 1",
    "&a [1, 2]",
    "*a",
    "*undefined",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{",
    "|\n  text",
    ">-\n  text",
    "\"unterminated",
    "[unterminated",
    "- a\n- b",
    "? complex\n: key",
    "<<: {x: 1}",
    "%YAML 1.2",
    "---",
    "...",
    "\t1",
];

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(TOKENS).prop_map(str::to_string),
        1 => any::<i128>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| v.to_string()),
        1 => "[ -~]{0,40}",
        1 => any::<String>(),
    ]
}

/// The checked property: `Ok` configs reload from their own YAML to the same YAML; errors
/// have a message.
fn check(result: Result<Config, sepdist_config::ConfigError>) -> Result<(), TestCaseError> {
    match result {
        Ok(config) => {
            let yaml = config.to_yaml();
            let again = load_str(
                ConfigSource {
                    name: Path::new("roundtrip.yaml"),
                    text: &yaml,
                },
                &[],
            );
            let again = again.map_err(|e| {
                TestCaseError::fail(format!("a valid config does not reload: {e}\n{yaml}"))
            })?;
            prop_assert_eq!(again.to_yaml(), yaml);
            // The derived values that `config show` prints.
            let m = &config.model;
            let _ = (
                m.freq_bins(),
                m.head_dim(),
                m.mask_hidden(),
                m.bands.widths(),
            );
            let _ = m.frames(config.dataset.segment_length);
            for w in [1, 2, 4, 8, usize::MAX] {
                let _ = config.training.effective_batch(w);
            }
        }
        Err(e) => prop_assert!(!e.to_string().trim().is_empty()),
    }
    Ok(())
}

fn load(text: &str, overrides: &[String]) -> Result<(), TestCaseError> {
    check(load_str(
        ConfigSource {
            name: Path::new("fuzz.yaml"),
            text,
        },
        overrides,
    ))
}

#[test]
fn fuzz_yaml_byte_mutations() {
    let bases = bases();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    fuzz(
        "config/yaml_bytes",
        1_000,
        (any::<Index>(), mutations(8)),
        |(base, muts)| {
            let (_, text) = &bases[base.index(bases.len())];
            let bytes = apply(text.as_bytes(), &muts, Endian::Little, |_| Vec::new());
            load(&String::from_utf8_lossy(&bytes), &[])?;
            // Through the file reader as well: invalid UTF-8 is an I/O error there.
            std::fs::write(&file, &bytes).unwrap();
            check(load_file(&file, &[]))
        },
    );
}

#[derive(Debug, Clone)]
enum Edit {
    /// Replaces the value of a `key: value` line (or appends one to a `key:` line).
    Value(Index, String),
    Delete(Index),
    Duplicate(Index, Index),
    /// Inserts `key: value` with `indent` spaces, the key a schema name (leaf or section).
    Insert(Index, usize, Index, String),
    /// Changes the indentation of a line.
    Indent(Index, usize),
    Tabs(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => (any::<Index>(), token()).prop_map(|(i, t)| Edit::Value(i, t)),
        1 => any::<Index>().prop_map(Edit::Delete),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| Edit::Duplicate(i, j)),
        2 => (any::<Index>(), 0usize..7, any::<Index>(), token())
            .prop_map(|(i, n, k, t)| Edit::Insert(i, n, k, t)),
        1 => (any::<Index>(), 0usize..9).prop_map(|(i, n)| Edit::Indent(i, n)),
        1 => any::<Index>().prop_map(Edit::Tabs),
    ]
}

fn edit_text(text: &str, edits: &[Edit], names: &[String]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for e in edits {
        let n = lines.len();
        match e {
            Edit::Value(i, token) if n > 0 => {
                let line = &mut lines[i.index(n)];
                if let Some(colon) = line.find(':') {
                    line.truncate(colon + 1);
                    line.push(' ');
                    line.push_str(token);
                }
            }
            Edit::Delete(i) if n > 0 => {
                lines.remove(i.index(n));
            }
            Edit::Duplicate(i, j) if n > 0 => {
                let line = lines[i.index(n)].clone();
                lines.insert(j.index(n + 1), line);
            }
            Edit::Insert(i, indent, key, token) => {
                let name = &names[key.index(names.len())];
                let name = name.rsplit('.').next().unwrap_or(name);
                lines.insert(
                    i.index(n + 1),
                    format!("{}{name}: {token}", " ".repeat(*indent)),
                );
            }
            Edit::Indent(i, indent) if n > 0 => {
                let line = &mut lines[i.index(n)];
                *line = format!("{}{}", " ".repeat(*indent), line.trim_start());
            }
            Edit::Tabs(i) if n > 0 => {
                let line = &mut lines[i.index(n)];
                *line = line.replacen("  ", "\t", 1);
            }
            _ => {}
        }
    }
    lines.join("\n")
}

#[test]
fn fuzz_yaml_edits() {
    let bases = bases();
    let names = schema_keys();
    fuzz(
        "config/yaml_edits",
        2_000,
        (any::<Index>(), prop::collection::vec(edit(), 1..6)),
        |(base, edits)| {
            let (_, text) = &bases[base.index(bases.len())];
            load(&edit_text(text, &edits, &names), &[])
        },
    );
}

/// YAML documents built from schema names and stress values, nested up to four levels.
fn document(names: Vec<String>) -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        token().prop_map(|t| serde_yaml_ng::from_str::<Value>(&t).unwrap_or(Value::String(t))),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ];
    let key = prop_oneof![
        4 => prop::sample::select(names)
            .prop_map(|k| k.rsplit('.').next().unwrap_or(&k).to_string()),
        1 => "[a-z_]{1,12}",
    ];
    let tree = leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
            prop::collection::vec((key.clone(), inner), 0..8).prop_map(|kv| {
                Value::Mapping(kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
            }),
        ]
    });
    tree.prop_map(|v| serde_yaml_ng::to_string(&v).unwrap_or_default())
}

#[test]
fn fuzz_yaml_arbitrary_text() {
    let names = schema_keys();
    fuzz(
        "config/yaml_text",
        4_000,
        prop_oneof![
            any::<String>(),
            "[ -~\n\t]{0,400}",
            "([a-z_]{1,20}:( [ -~]{0,20})?\n( {2,6}[a-z_]{1,20}: [ -~]{0,20}\n){0,6}){0,8}",
            document(names),
        ],
        |text| load(&text, &[]),
    );
}

fn overrides(keys: Vec<String>) -> impl Strategy<Value = Vec<String>> {
    let spec = prop_oneof![
        6 => (prop::sample::select(keys), token()).prop_map(|(k, v)| format!("{k}={v}")),
        1 => ("[a-z_.]{0,30}", token()).prop_map(|(k, v)| format!("{k}={v}")),
        1 => any::<String>(),
        1 => "[ -~]{0,60}",
    ];
    prop::collection::vec(spec, 1..5)
}

#[test]
fn fuzz_set_overrides() {
    let bases = bases();
    let quickstart = bases
        .iter()
        .find(|(name, _)| name == "quickstart.yaml")
        .map(|(_, text)| text.clone())
        .unwrap();
    fuzz(
        "config/set_overrides",
        4_000,
        overrides(schema_keys()),
        |sets| load(&quickstart, &sets),
    );
}
