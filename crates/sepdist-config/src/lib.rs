//! sepdist configuration: the YAML schema of MODEL.md, loading with located errors,
//! dotted `--set` overrides typed by the schema, and cross-field validation.
//! No candle, no MPI: every other crate depends on this one.

mod schema;

pub use schema::*;
