//! The error type of this crate.

/// Errors of model construction and execution.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape mismatch, device, dtype, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model configuration cannot describe a valid separator.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A caller-supplied argument (tensor shape, parameter list) does not fit the model.
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
