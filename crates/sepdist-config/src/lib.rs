//! sepdist configuration: the YAML schema of MODEL.md, loading with located errors,
//! dotted `--set` overrides typed by the schema, and cross-field validation.
//! No candle, no MPI: every other crate depends on this one.

mod error;
mod load;
mod schema;
mod validate;

pub use error::{ConfigError, Origin, RuleViolation};
pub use load::{ConfigSource, load_file, load_str};
pub use schema::*;
pub use validate::{MAX_SYNTHETIC_FRAMES, MAX_SYNTHETIC_TRACKS, synthetic_too_large, validate};

impl Config {
    /// The resolved config as YAML, every default filled in.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"))
    }
}
