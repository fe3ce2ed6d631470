//! The crate's error type. Every variant that comes from a file names that file.

use std::path::PathBuf;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot decode WAV: {source}", path.display())]
    Wav {
        path: PathBuf,
        #[source]
        source: hound::Error,
    },
    #[error("{}: sample rate {found} Hz, expected {expected} Hz", path.display())]
    SampleRate {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{}: {channels} channels; only mono and stereo are supported", path.display())]
    Channels { path: PathBuf, channels: u16 },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("{}: no {split} tracks", path.display())]
    NoTracks { path: PathBuf, split: &'static str },
    /// A training example could not be built from readable files within the attempt budget.
    #[error(
        "example (epoch {epoch}, index {index}): gave up after {attempts} attempts with unreadable files; last: {last}"
    )]
    TooManyBadFiles {
        epoch: u64,
        index: u64,
        attempts: u32,
        last: Box<DataError>,
    },
    /// A caller-supplied argument is out of range (not tied to a file).
    #[error("invalid argument: {0}")]
    Argument(String),
    #[error("data loader worker panicked: {0}")]
    WorkerPanic(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn wav(path: impl Into<PathBuf>, source: hound::Error) -> Self {
        let path = path.into();
        match source {
            hound::Error::IoError(source) => DataError::Io { path, source },
            source => DataError::Wav { path, source },
        }
    }

    /// The file this error is about, when there is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            DataError::Io { path, .. }
            | DataError::Wav { path, .. }
            | DataError::SampleRate { path, .. }
            | DataError::Channels { path, .. }
            | DataError::Invalid { path, .. }
            | DataError::NoTracks { path, .. } => Some(path),
            DataError::TooManyBadFiles { last, .. } => last.path(),
            DataError::Argument(_) | DataError::WorkerPanic(_) => None,
        }
    }
}
