//! Loading: YAML text → unknown-key check with suggestions → typed deserialisation with
//! line numbers → `--set` overrides typed by the schema → cross-field validation.

use crate::error::{ConfigError, Origin};
use crate::schema::Config;
use serde_yaml_ng::{Mapping, Value};
use std::path::Path;

/// A config file's contents with the file name kept for messages.
pub struct ConfigSource<'a> {
    pub name: &'a Path,
    pub text: &'a str,
}

/// Reads, overrides and validates a config file.
pub fn load_file(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(
        ConfigSource {
            name: path,
            text: &text,
        },
        overrides,
    )
}

/// Like [`load_file`] for text already in memory.
pub fn load_str(source: ConfigSource<'_>, overrides: &[String]) -> Result<Config, ConfigError> {
    let file_origin = |loc: Option<serde_yaml_ng::Location>| Origin::File {
        path: source.name.to_path_buf(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
    };
    let mut tree: Value =
        serde_yaml_ng::from_str(source.text).map_err(|e| ConfigError::Syntax {
            origin: file_origin(e.location()),
            message: message_without_location(&e),
        })?;
    if tree.is_null() {
        tree = Value::Mapping(Mapping::new());
    }
    let schema = schema_tree();
    if let Some((key, suggestion)) = first_unknown_key(&tree, &schema, "") {
        // The typed pass knows the line of the first unknown field.
        let location = serde_yaml_ng::from_str::<Config>(source.text)
            .err()
            .filter(|e| e.to_string().contains("unknown field"))
            .and_then(|e| e.location());
        return Err(ConfigError::UnknownKey {
            origin: file_origin(location),
            key,
            suggestion,
        });
    }
    let mut config: Config =
        serde_yaml_ng::from_str(source.text).map_err(|e| ConfigError::Type {
            origin: file_origin(e.location()),
            message: message_without_location(&e),
        })?;
    if !overrides.is_empty() {
        for spec in overrides {
            apply_override(&mut tree, &schema, spec)?;
            // Deserialise after each one so that a type error names its override.
            config = serde_yaml_ng::from_value(tree.clone()).map_err(|e| ConfigError::Type {
                origin: Origin::Override(spec.clone()),
                message: message_without_location(&e),
            })?;
        }
    }
    let violations = crate::validate::validate(&config);
    if !violations.is_empty() {
        return Err(ConfigError::Invalid {
            origin: file_origin(None),
            overrides: overrides.to_vec(),
            violations,
        });
    }
    Ok(config)
}

/// The key tree of the schema: the default config serialised. Optional keys serialise as
/// null, so every key of the schema is present.
fn schema_tree() -> Value {
    serde_yaml_ng::to_value(Config::default()).unwrap_or(Value::Null)
}

fn dotted(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// Nearest valid key by edit distance, if it is plausibly a typo.
fn nearest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(key, c), c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 3) || c.contains(key) || key.contains(c))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

fn schema_keys(schema: &Mapping) -> impl Iterator<Item = &str> {
    schema.keys().filter_map(Value::as_str)
}

/// First key (in document order) of `tree` that the schema does not have, with the dotted
/// path of the nearest valid key.
fn first_unknown_key(
    tree: &Value,
    schema: &Value,
    prefix: &str,
) -> Option<(String, Option<String>)> {
    let (Value::Mapping(tree), Value::Mapping(schema)) = (tree, schema) else {
        return None;
    };
    for (key, value) in tree {
        let name = key_text(key);
        match schema.get(&name) {
            None => {
                let suggestion = nearest(&name, schema_keys(schema)).map(|s| dotted(prefix, &s));
                return Some((dotted(prefix, &name), suggestion));
            }
            Some(sub) => {
                if let Some(found) = first_unknown_key(value, sub, &dotted(prefix, &name)) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// `a.b.c=value`: the value is parsed as YAML (`[768, 768]`, `2`, `true`, `null`), except
/// that a scalar given to a string key keeps its raw text (`--set training.output_dir=123`).
fn apply_override(tree: &mut Value, schema: &Value, spec: &str) -> Result<(), ConfigError> {
    let bad = |message: &str| ConfigError::BadOverride {
        spec: spec.to_string(),
        message: message.to_string(),
    };
    let (path, raw) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE, e.g. training.batch_size=2"))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(bad("the key is empty or has an empty segment"));
    }
    let segments: Vec<&str> = path.split('.').collect();
    let mut schema_node = schema;
    for (depth, segment) in segments.iter().enumerate() {
        let prefix = segments[..depth].join(".");
        let unknown = |suggestion| ConfigError::UnknownKey {
            origin: Origin::Override(spec.to_string()),
            key: path.to_string(),
            suggestion,
        };
        // A leaf reached before the path ends: `training.batch_size.x` has no such key.
        let Value::Mapping(map) = schema_node else {
            return Err(unknown(None));
        };
        schema_node = map.get(*segment).ok_or_else(|| {
            unknown(nearest(segment, schema_keys(map)).map(|s| dotted(&prefix, &s)))
        })?;
    }
    let parsed = serde_yaml_ng::from_str::<Value>(raw).map_err(|e| ConfigError::BadOverride {
        spec: spec.to_string(),
        message: format!(
            "the value is not valid YAML: {}",
            message_without_location(&e)
        ),
    })?;
    let value = match parsed {
        Value::Sequence(_) | Value::Mapping(_) | Value::String(_) => parsed,
        _ if schema_node.is_string() => Value::String(raw.to_string()),
        scalar => scalar,
    };
    let mut node = tree;
    for segment in &segments {
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        node = match node {
            Value::Mapping(map) => map
                .entry(Value::String((*segment).to_string()))
                .or_insert(Value::Null),
            other => other,
        };
    }
    *node = value;
    Ok(())
}

/// serde_yaml appends " at line L column C"; the location is shown separately.
fn message_without_location(e: &serde_yaml_ng::Error) -> String {
    let text = e.to_string();
    match (e.location(), text.rfind(" at line ")) {
        (Some(_), Some(i)) => text[..i].to_string(),
        _ => text,
    }
}
