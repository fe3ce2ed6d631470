use std::fmt;
use std::path::PathBuf;

/// Where a config value came from: a file position or a `--set` override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
    },
    Override(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => {
                write!(f, "{}", path.display())?;
                if let Some(line) = line {
                    write!(f, ":{line}")?;
                    if let Some(column) = column {
                        write!(f, ":{column}")?;
                    }
                }
                Ok(())
            }
            Origin::Override(spec) => write!(f, "--set {spec}"),
        }
    }
}

/// One broken cross-field rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleViolation {
    /// Dotted key the rule is about, e.g. `model.bands`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for RuleViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: invalid YAML: {message}")]
    Syntax { origin: Origin, message: String },
    #[error("{origin}: unknown key `{key}`{}", suggestion_text(suggestion))]
    UnknownKey {
        origin: Origin,
        key: String,
        suggestion: Option<String>,
    },
    #[error("{origin}: {message}")]
    Type { origin: Origin, message: String },
    #[error("malformed override `{spec}`: {message}")]
    BadOverride { spec: String, message: String },
    #[error(
        "{origin}{}: invalid configuration:\n{}",
        after_overrides(overrides),
        list(violations)
    )]
    Invalid {
        origin: Origin,
        /// The `--set` overrides applied before validation, for the message.
        overrides: Vec<String>,
        violations: Vec<RuleViolation>,
    },
}

fn suggestion_text(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

fn after_overrides(overrides: &[String]) -> String {
    if overrides.is_empty() {
        String::new()
    } else {
        let sets: Vec<String> = overrides.iter().map(|s| format!("--set {s}")).collect();
        format!(" (after {})", sets.join(" "))
    }
}

fn list(violations: &[RuleViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("  - {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}
